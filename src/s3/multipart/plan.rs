//! Part sizing: how an object is cut into parts that S3 accepts.
//!
//! S3's limits: every part but the last is at least 5 MiB, no part is over 5 GiB, an
//! upload has at most 10,000 parts, and an object is at most 5 TiB.
//!
//! - **Known length** (bytes, a file, a stream whose length is given): the part size
//!   is the configured one, raised (rounded up to a whole MiB) until the object fits
//!   in 10,000 parts.
//! - **Unknown length** (a stream or reader that ends when it ends): parts start at
//!   the configured size and the size doubles after every 1,000 parts. With the
//!   5 MiB default, parts 1-1,000 are 5 MiB, 1,001-2,000 are 10 MiB, ... and parts
//!   9,001-10,000 are 2.5 GiB, so 10,000 parts hold 5 MiB x 1,023 x 1,000 (about
//!   5 TB, close to S3's 5 TiB object limit) while small streams keep small parts
//!   and memory stays at part size x parts in flight until a stream is very large.
//! - **Copy**: the same rule as a known length, applied to byte ranges of the source.

/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;
/// The smallest part S3 accepts (all parts but the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// The most parts one multipart upload may have.
pub const MAX_PARTS: u32 = 10_000;
/// The largest object S3 stores (5 TiB).
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * MIB;
/// For unknown lengths, the part size doubles after this many parts.
pub const PARTS_PER_SIZE_STEP: u32 = 1_000;

/// Clamps a configured part size into what S3 accepts.
pub fn clamp_part_size(part_size: u64) -> u64 {
    part_size.clamp(MIN_PART_SIZE, MAX_PART_SIZE)
}

/// The part size for an object of known `length`: `part_size` (clamped to S3's
/// limits), raised to a whole number of MiB until `length` fits in 10,000 parts.
///
/// Returns `None` when `length` is over S3's 5 TiB object limit.
pub fn part_size_for_length(length: u64, part_size: u64) -> Option<u64> {
    if length > MAX_OBJECT_SIZE {
        return None;
    }
    let needed = length.div_ceil(u64::from(MAX_PARTS));
    let needed_mib = needed.div_ceil(MIB) * MIB;
    Some(clamp_part_size(part_size.max(needed_mib)))
}

/// How many parts an object of `length` has with parts of `part_size` (at least one).
pub fn part_count(length: u64, part_size: u64) -> u32 {
    let count = length.div_ceil(part_size.max(1)).max(1);
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// The size of part `part_number` (1-based) of a stream of unknown length whose
/// first parts are `part_size`: doubled after every [`PARTS_PER_SIZE_STEP`] parts,
/// never over 5 GiB.
pub fn part_size_for_unknown_length(part_number: u32, part_size: u64) -> u64 {
    let steps = part_number.saturating_sub(1) / PARTS_PER_SIZE_STEP;
    let grown = clamp_part_size(part_size).saturating_mul(1u64 << steps.min(32));
    grown.min(MAX_PART_SIZE)
}

/// One part of a multipart copy: its number and the inclusive byte range of the
/// source it copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRange {
    /// 1-based part number.
    pub part_number: u32,
    /// First byte of the source in this part.
    pub first: u64,
    /// Last byte of the source in this part (inclusive).
    pub last: u64,
}

impl CopyRange {
    /// The `x-amz-copy-source-range` value, `bytes=first-last`.
    pub fn header_value(&self) -> String {
        format!("bytes={}-{}", self.first, self.last)
    }

    /// Bytes in this part.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Always `false`: a range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The parts of a multipart copy of a `length`-byte object: consecutive inclusive
/// ranges covering every byte, sized by [`part_size_for_length`].
///
/// Returns `None` when `length` is zero (copy it with one CopyObject) or over 5 TiB.
pub fn plan_copy_ranges(length: u64, part_size: u64) -> Option<Vec<CopyRange>> {
    if length == 0 {
        return None;
    }
    let size = part_size_for_length(length, part_size)?;
    let count = part_count(length, size);
    Some(
        (0..count)
            .map(|index| {
                let first = u64::from(index) * size;
                CopyRange {
                    part_number: index + 1,
                    first,
                    last: (first + size).min(length) - 1,
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_length_keeps_the_configured_size_when_it_fits() {
        assert_eq!(part_size_for_length(64 * MIB, 5 * MIB), Some(5 * MIB));
        assert_eq!(part_count(64 * MIB, 5 * MIB), 13);
        // 10,000 parts of 5 MiB exactly.
        assert_eq!(part_size_for_length(50_000 * MIB, 5 * MIB), Some(5 * MIB));
    }

    #[test]
    fn known_length_grows_the_part_size_to_fit_ten_thousand_parts() {
        let length = 100 * 1024 * MIB; // 100 GiB
        let size = part_size_for_length(length, 5 * MIB).unwrap();
        assert_eq!(size, 11 * MIB, "100 GiB / 10,000 = 10.24 MiB, rounded up");
        assert!(part_count(length, size) <= MAX_PARTS);

        let size = part_size_for_length(MAX_OBJECT_SIZE, 5 * MIB).unwrap();
        assert!(part_count(MAX_OBJECT_SIZE, size) <= MAX_PARTS);
        assert!(size <= MAX_PART_SIZE);
    }

    #[test]
    fn sizes_are_clamped_to_the_limits() {
        assert_eq!(part_size_for_length(10 * MIB, 1), Some(MIN_PART_SIZE));
        assert_eq!(
            part_size_for_length(10 * MIB, u64::MAX),
            Some(MAX_PART_SIZE)
        );
        assert_eq!(part_size_for_length(MAX_OBJECT_SIZE + 1, 5 * MIB), None);
    }

    #[test]
    fn unknown_length_doubles_every_thousand_parts() {
        assert_eq!(part_size_for_unknown_length(1, 5 * MIB), 5 * MIB);
        assert_eq!(part_size_for_unknown_length(1_000, 5 * MIB), 5 * MIB);
        assert_eq!(part_size_for_unknown_length(1_001, 5 * MIB), 10 * MIB);
        assert_eq!(part_size_for_unknown_length(2_001, 5 * MIB), 20 * MIB);
        assert_eq!(part_size_for_unknown_length(10_000, 5 * MIB), 2560 * MIB);
        assert_eq!(
            part_size_for_unknown_length(10_000, 64 * MIB),
            MAX_PART_SIZE
        );
        let capacity: u64 = (1..=MAX_PARTS)
            .map(|n| part_size_for_unknown_length(n, 5 * MIB))
            .sum();
        assert_eq!(capacity, 5 * MIB * 1_023 * 1_000);
    }

    #[test]
    fn copy_ranges_cover_every_byte_once() {
        let length = 12 * MIB + 7;
        let ranges = plan_copy_ranges(length, 5 * MIB).unwrap();
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0].header_value(), format!("bytes=0-{}", 5 * MIB - 1));
        assert_eq!(ranges[2].first, 10 * MIB);
        assert_eq!(ranges[2].last, length - 1);
        assert_eq!(ranges[2].len(), 2 * MIB + 7);
        let mut next = 0;
        for (index, range) in ranges.iter().enumerate() {
            assert_eq!(range.part_number as usize, index + 1);
            assert_eq!(range.first, next);
            next = range.last + 1;
        }
        assert_eq!(next, length);
    }

    #[test]
    fn copy_ranges_of_a_large_object_stay_within_the_limits() {
        let length = 5 * 1024 * MIB + 1; // just over 5 GiB
        let ranges = plan_copy_ranges(length, 512 * MIB).unwrap();
        assert_eq!(ranges.len(), 11);
        assert_eq!(ranges.last().unwrap().len(), 1);

        let ranges = plan_copy_ranges(MAX_OBJECT_SIZE, 512 * MIB).unwrap();
        assert!(ranges.len() <= MAX_PARTS as usize);
        assert!(ranges.iter().all(|r| r.len() <= MAX_PART_SIZE));
        assert_eq!(ranges.last().unwrap().last, MAX_OBJECT_SIZE - 1);
    }

    #[test]
    fn copy_of_nothing_or_too_much_has_no_plan() {
        assert_eq!(plan_copy_ranges(0, 5 * MIB), None);
        assert_eq!(plan_copy_ranges(MAX_OBJECT_SIZE + 1, 5 * MIB), None);
        let one = plan_copy_ranges(1, 5 * MIB).unwrap();
        assert_eq!(
            one,
            vec![CopyRange {
                part_number: 1,
                first: 0,
                last: 0
            }]
        );
    }
}
