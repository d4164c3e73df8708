use super::*;
use crate::classify::ClassifiedError;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A service that counts how often it is called (not merely polled).
fn counting() -> (
    Arc<AtomicUsize>,
    impl Service<Vec<u8>, Response = usize, Error = std::io::Error> + Clone,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let svc = service_fn(move |batch: Vec<u8>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::io::Error>(batch.len()) }
    });
    (calls, svc)
}

#[tokio::test]
async fn default_limits_accept_1_to_1000() {
    let (calls, inner) = counting();
    let mut svc = BatchSize::new(inner);
    for len in [1usize, 2, 999, 1000] {
        let got = svc.ready().await.unwrap().call(vec![0; len]).await.unwrap();
        assert_eq!(got, len);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn rejects_empty_and_oversized_without_calling_inner() {
    let (calls, inner) = counting();
    let mut svc = BatchSize::new(inner);

    let err = svc.ready().await.unwrap().call(vec![]).await.unwrap_err();
    assert_eq!(err.rejection(), Some(BatchSizeError::Empty));

    let err = svc
        .ready()
        .await
        .unwrap()
        .call(vec![0; 1001])
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(BatchSizeError::TooLarge {
            len: 1001,
            max: 1000
        })
    );
    assert_eq!(
        err.to_string(),
        "batch of 1001 items exceeds the maximum of 1000"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "inner service was called");
}

#[tokio::test]
async fn allow_empty_and_custom_max() {
    let (calls, inner) = counting();
    let mut svc = BatchSizeLayer::new().max(2).allow_empty(true).layer(inner);
    assert!(svc.allows_empty());
    assert_eq!(svc.max(), 2);
    assert_eq!(svc.ready().await.unwrap().call(vec![]).await.unwrap(), 0);
    assert_eq!(
        svc.ready().await.unwrap().call(vec![1, 2]).await.unwrap(),
        2
    );
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(vec![1, 2, 3])
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(BatchSizeError::TooLarge { len: 3, max: 2 })
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn inner_errors_pass_through() {
    let mut svc = BatchSize::new(service_fn(|_: Vec<u8>| async {
        Err::<(), _>(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"))
    }));
    let err = svc.ready().await.unwrap().call(vec![1]).await.unwrap_err();
    assert!(err.rejection().is_none());
    assert_eq!(err.to_string(), "slow");
    assert_eq!(err.classification().class, "timeout");
    assert_eq!(
        err.into_inner().unwrap().kind(),
        std::io::ErrorKind::TimedOut
    );
}

#[test]
fn rejection_is_a_permanent_failure() {
    use crate::classify::{ByError, Classify};
    let err: Error<std::io::Error> = BatchSizeError::TooLarge { len: 5, max: 1 }.into();
    let verdict = Classify::<(), _>::classify(&ByError, Err(&err));
    assert!(verdict.is_failure());
    assert!(!verdict.should_retry());
    assert_eq!(verdict.class, "batch_size");
}

#[test]
fn batch_len_impls() {
    use std::collections::VecDeque;
    let v = vec![1, 2, 3];
    assert_eq!(v.batch_len(), 3);
    assert_eq!(v[..2].batch_len(), 2);
    let by_ref: &Vec<i32> = &v;
    assert_eq!(BatchLen::batch_len(&by_ref), 3);
    assert_eq!([0u8; 4].batch_len(), 4);
    assert_eq!(VecDeque::from(vec![1]).batch_len(), 1);
    let boxed: Box<[u8]> = vec![1, 2].into_boxed_slice();
    assert_eq!(boxed.batch_len(), 2);
    let shared: Arc<[u8]> = Arc::from(vec![1u8]);
    assert_eq!(shared.batch_len(), 1);
}

#[tokio::test]
async fn poll_ready_errors_of_inner_pass_through() {
    use std::task::Poll;
    #[derive(Clone, Debug)]
    struct NeverReady;
    impl Service<Vec<u8>> for NeverReady {
        type Response = ();
        type Error = &'static str;
        type Future = std::future::Ready<Result<(), &'static str>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err("broken"))
        }
        fn call(&mut self, _: Vec<u8>) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let mut svc = BatchSize::new(NeverReady);
    let err = svc.ready().await.unwrap_err();
    assert!(matches!(err, Error::Inner("broken")));
}
