//! The outputs stage: between the encoders and the sink thread, each result
//! goes to its output topics, retried while its partition is this
//! worker's, then on to the sink thread.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::Producer as _;

use super::{DeliveryError, KafkaOutputs};
use crate::ack::AckToken;
use crate::dead_letter::{Kind, Stage};
use crate::record::Done;

/// Runs the outputs stage until `rx` closes: each result goes to the
/// output topics (when configured), then on to the sink thread.
///
/// Transient delivery errors are retried (with backoff and jitter) for as
/// long as the record's partition is still this worker's: giving up would
/// hold the partition's commits back for good. A row the topics refuse for
/// good (too large, invalid) becomes a dead letter (`output_rejected`); a
/// dead letter the dead-letter topic refuses even when cut down to its
/// headers is fatal (the topic is unusable).
pub fn spawn(
    rx: flume::Receiver<Done>,
    tx: flume::Sender<Done>,
    outputs: Option<Arc<KafkaOutputs>>,
    fatal: Arc<crate::fatal::Fatal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok(done) = rx.recv_async().await {
            while tasks.try_join_next().is_some() {}
            let Some(out) = outputs.clone() else {
                if tx.send_async(done).await.is_err() {
                    break;
                }
                continue;
            };
            let (tx, fatal) = (tx.clone(), Arc::clone(&fatal));
            tasks.spawn(async move {
                let next = deliver(&out, done, &fatal).await;
                let _ = tx.send_async(next).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Some(out) = outputs {
            let _ = out.producer.flush(Duration::from_secs(10));
        }
    })
}

/// Sends one result to the topics it belongs on; returns what the sink
/// thread gets.
async fn deliver(out: &KafkaOutputs, done: Done, fatal: &crate::fatal::Fatal) -> Done {
    match done {
        Done::Row {
            row,
            origin,
            ack,
            permit,
        } if ack.is_current() => match retrying(&ack, || out.row(&row)).await {
            Ok(()) => Done::Row {
                row,
                origin,
                ack,
                permit,
            },
            Err(DeliveryError::Permanent(why)) => {
                tracing::warn!(id = %row.id, %why, "an output topic refused the record; dead-lettering it");
                let letter =
                    origin.dead_letter(Some(row.id), Stage::Output, Kind::OutputRejected, why);
                Box::pin(deliver(
                    out,
                    Done::Dead {
                        letter,
                        ack,
                        permit,
                    },
                    fatal,
                ))
                .await
            }
            Err(e) => {
                if let DeliveryError::Broken(why) = &e {
                    fatal.set(format!("the Kafka producer cannot go on: {why}"));
                }
                Done::Failed {
                    reason: e.to_string(),
                    ack,
                    permit,
                }
            }
        },
        Done::Dead {
            letter,
            ack,
            permit,
        } if ack.is_current() => {
            let Some(topic) = out.dead_letters.as_deref() else {
                // Dead letters go to a file: the sink thread writes it.
                return Done::Dead {
                    letter,
                    ack,
                    permit,
                };
            };
            match retrying(&ack, || out.dead_letter(topic, &letter)).await {
                Ok(()) => Done::Dead {
                    letter,
                    ack,
                    permit,
                },
                Err(e) => {
                    match &e {
                        DeliveryError::Permanent(why) => fatal.set(format!(
                            "the dead-letter topic {topic} refuses even a header-only dead letter: {why}"
                        )),
                        DeliveryError::Broken(why) => {
                            fatal.set(format!("the Kafka producer cannot go on: {why}"))
                        }
                        DeliveryError::Transient(_) => {}
                    }
                    Done::Failed {
                        reason: e.to_string(),
                        ack,
                        permit,
                    }
                }
            }
        }
        other => other,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the record's
/// partition is no longer this worker's.
async fn retrying<F, Fut>(ack: &AckToken, mut attempt: F) -> Result<(), DeliveryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DeliveryError>>,
{
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match attempt().await {
            Err(DeliveryError::Transient(why)) if ack.is_current() => {
                let pause = backoff.next_delay();
                tracing::warn!(%why, retry_in_ms = pause.as_millis() as u64, "delivery failed; retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::{AckTracker, PartitionKey, Position};

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_partition_is_gone() {
        // Three retries: about 0.5 + 1 + 2 s of backoff.
        let tracker = AckTracker::new();
        let key = PartitionKey {
            source: "t".into(),
            partition: 0,
        };
        tracker.assign(&key, 0);
        let ack = tracker.token(key.clone(), Position { seq: 0, offset: 0 });
        let mut calls = 0;
        let r = retrying(&ack, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 4 {
                    Err(DeliveryError::Transient("broker down".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!((r, calls), (Ok(()), 4));
        let mut calls = 0;
        let r = retrying(&ack, || {
            calls += 1;
            async { Err(DeliveryError::Permanent("too large".into())) }
        })
        .await;
        assert!(matches!(r, Err(DeliveryError::Permanent(_))));
        assert_eq!(calls, 1, "permanent errors are not retried");
        tracker.revoke(&key);
        let r = retrying(&ack, || async {
            Err(DeliveryError::Transient("broker down".into()))
        })
        .await;
        assert!(
            matches!(r, Err(DeliveryError::Transient(_))),
            "revoked: give up"
        );
        ack.delivered();
    }
}
