//! docs/COMPARISON.md is generated from the `compare_*` examples by
//! `scripts/count-compare --doc`; these tests fail when it drifts from them or
//! when an example loses its measured region or its list of what it leaves out.

use std::process::Command;

fn count_compare(arg: Option<&str>) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/count-compare")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(arg) = arg {
        cmd.arg(arg);
    }
    let out = cmd.output().expect("bash runs scripts/count-compare");
    assert!(
        out.status.success(),
        "scripts/count-compare {arg:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn the_comparison_doc_is_what_the_script_generates() {
    count_compare(Some("--check"));
}

#[test]
fn every_task_has_measured_regions_and_a_left_out_list() {
    let table = count_compare(None);
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "publish, consume, upload:\n{table}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let keel: u32 = cells[2].parse().expect("keel count");
        let raw: u32 = cells[3].parse().expect("raw count");
        assert!(keel > 0 && raw > 0, "a region is missing: {row}");
        assert!(cells[5].starts_with("• "), "no left-out list: {row}");
    }
}
