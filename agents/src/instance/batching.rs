//! How a batch grows (the instance's batching policy).

use tokio::sync::mpsc;

use crate::registry::Event;

/// How a batch grows: whatever is queued joins it, up to `max` events; when nothing is, it
/// waits one scheduler round, once, for callers that the last sync released and that are
/// sending again right now (to join this commit rather than the next one).
pub(super) struct Batching {
    max: usize,
    yielded: bool,
}

impl Batching {
    pub(super) fn new(max: usize) -> Self {
        Batching {
            max,
            yielded: false,
        }
    }

    /// The next event of a batch that holds `len` outcomes; `None`: commit now.
    pub(super) async fn next(
        &mut self,
        len: usize,
        rx: &mut mpsc::Receiver<Event>,
    ) -> Option<Event> {
        if len >= self.max {
            return None;
        }
        if let Ok(event) = rx.try_recv() {
            return Some(event);
        }
        if std::mem::replace(&mut self.yielded, true) {
            return None;
        }
        tokio::task::yield_now().await;
        rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_its_limit_and_waits_one_round_once() {
        let (tx, mut rx) = mpsc::channel(16);
        for _ in 0..3 {
            tx.send(Event::Warm).await.unwrap();
        }
        let mut batch = Batching::new(3);
        assert!(batch.next(1, &mut rx).await.is_some());
        assert!(batch.next(2, &mut rx).await.is_some());
        assert!(batch.next(3, &mut rx).await.is_none(), "full: commit now");
        // Empty: one scheduler round for a sender that is about to send...
        let late = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Event::Warm).await.unwrap() }
        });
        let mut batch = Batching::new(256);
        assert!(batch.next(1, &mut rx).await.is_some(), "the queued one");
        assert!(
            batch.next(2, &mut rx).await.is_some(),
            "the late one joined"
        );
        late.await.unwrap();
        // ...but only once per batch.
        assert!(batch.next(3, &mut rx).await.is_none());
    }
}
