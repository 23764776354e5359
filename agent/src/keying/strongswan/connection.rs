//! One VICI connection to charon: rsvici's client over a socket that reports its own loss.
//!
//! rsvici 0.1.5 does not notice a closed socket: its reader task gets EOF, logs it to an
//! optional error channel and reads again at once (a busy loop), and a request waiting
//! for its answer waits forever. So the socket handed to rsvici is wrapped: on EOF or a
//! read error it records the loss (a `watch` channel every request races against) and
//! then stays silent (Pending) instead of returning EOF again. Every request also has a
//! deadline; after a lost socket or a timeout the connection is dropped, never reused (a
//! late answer would be taken for the next request's).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::messages::CommandResult;
use crate::keying::KeyingError;

const CONNECT_RETRIES: u32 = 50;
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// What ended a connection, once it ended.
pub type LossSignal = watch::Receiver<Option<String>>;

pub struct ViciConn {
    client: rsvici::Client,
    lost: LossSignal,
}

impl ViciConn {
    pub async fn connect(path: &Path) -> Result<ViciConn, KeyingError> {
        // charon listens with a short backlog; a burst of connections gets EAGAIN, which
        // only means "try again in a moment".
        let mut attempt = 0;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt < CONNECT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(KeyingError::Unreachable(format!(
                        "connect to VICI socket {}: {e}",
                        path.display()
                    )));
                }
            }
        };
        let (tx, lost) = watch::channel(None);
        let client = rsvici::Client::new(WatchedSocket {
            inner: stream,
            lost: tx,
            dead: false,
        });
        Ok(ViciConn { client, lost })
    }

    /// Why the connection ended, if it did.
    pub fn lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// A receiver that changes when the connection ends.
    pub fn loss_signal(&self) -> LossSignal {
        self.lost.clone()
    }

    /// A plain command (no streamed events).
    pub async fn request<T, U>(
        &mut self,
        command: &str,
        message: T,
        timeout: Duration,
    ) -> Result<U, KeyingError>
    where
        T: Serialize,
        U: DeserializeOwned,
    {
        let fut = self.client.request::<T, U>(command, message);
        guarded(command, timeout, &mut self.lost, fut).await
    }

    /// A command answering `success`/`errmsg`; `success = no` becomes `Refused`.
    pub async fn command<T: Serialize>(
        &mut self,
        command: &str,
        message: T,
        timeout: Duration,
    ) -> Result<CommandResult, KeyingError> {
        let res: CommandResult = self.request(command, message, timeout).await?;
        if !res.success {
            return Err(KeyingError::Refused {
                command: command.to_string(),
                reason: res
                    .errmsg
                    .unwrap_or_else(|| "charon answered success = no".into()),
            });
        }
        Ok(res)
    }

    /// A command that streams `event` messages before its answer; collects them all.
    pub async fn stream_request<T, U>(
        &mut self,
        command: &str,
        event: &str,
        message: T,
        timeout: Duration,
    ) -> Result<Vec<U>, KeyingError>
    where
        T: Serialize,
        U: DeserializeOwned,
    {
        let stream = self.client.stream_request::<T, U>(command, event, message);
        let fut = stream.try_collect::<Vec<U>>();
        guarded(command, timeout, &mut self.lost, fut).await
    }

    /// Like `stream_request`, but keeps the streamed items when charon refuses, so the
    /// caller can say why (e.g. the `control-log` lines of a failed initiate).
    pub async fn stream_request_keep<T, U>(
        &mut self,
        command: &str,
        event: &str,
        message: T,
        timeout: Duration,
        mut on_item: impl FnMut(&U),
    ) -> (Vec<U>, Result<(), KeyingError>)
    where
        T: Serialize,
        U: DeserializeOwned,
    {
        let mut items = Vec::new();
        let stream = self.client.stream_request::<T, U>(command, event, message);
        let result = {
            let items = &mut items;
            let fut = async move {
                futures::pin_mut!(stream);
                while let Some(item) = stream.next().await {
                    let item = item?;
                    on_item(&item);
                    items.push(item);
                }
                Ok::<(), rsvici::Error>(())
            };
            guarded(command, timeout, &mut self.lost, fut).await
        };
        (items, result)
    }

    /// Subscribes to one event; the stream ends with an error when the socket is lost.
    pub fn subscribe<U: DeserializeOwned + Send + 'static>(
        &mut self,
        event: &str,
    ) -> impl Stream<Item = Result<U, rsvici::Error>> + Send + 'static {
        self.client.subscribe::<U>(event)
    }
}

/// Runs one request against the connection's loss and a deadline.
async fn guarded<U>(
    command: &str,
    timeout: Duration,
    lost: &mut LossSignal,
    fut: impl Future<Output = Result<U, rsvici::Error>>,
) -> Result<U, KeyingError> {
    if let Some(why) = lost.borrow().clone() {
        return Err(KeyingError::Unreachable(format!("{command}: {why}")));
    }
    tokio::select! {
        res = tokio::time::timeout(timeout, fut) => match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(command, e)),
            Err(_) => Err(KeyingError::Timeout { command: command.to_string(), after: timeout }),
        },
        why = lost_reason(lost) => Err(KeyingError::Unreachable(format!("{command}: {why}"))),
    }
}

/// Waits until the connection is lost and says why.
pub async fn lost_reason(lost: &mut LossSignal) -> String {
    match lost.wait_for(|l| l.is_some()).await {
        Ok(why) => why.clone().unwrap_or_default(),
        Err(_) => "VICI connection closed".to_string(),
    }
}

/// rsvici's error categories as the trait's errors.
pub fn map_error(command: &str, e: rsvici::Error) -> KeyingError {
    use rsvici::error::Category;
    match e.classify() {
        Category::Io | Category::Closed => {
            KeyingError::Unreachable(format!("{command}: VICI connection failed: {e}"))
        }
        Category::CmdFailure => KeyingError::Refused {
            command: command.to_string(),
            reason: e
                .to_string()
                .trim_start_matches("command failed: ")
                .to_string(),
        },
        Category::UnknownCmd => KeyingError::Refused {
            command: command.to_string(),
            reason: "charon does not know this command (too old a strongSwan?)".into(),
        },
        Category::UnknownEvent => KeyingError::Refused {
            command: command.to_string(),
            reason: format!("charon does not know the event: {e}"),
        },
        Category::Data => KeyingError::Refused {
            command: command.to_string(),
            reason: format!("unexpected VICI message: {e}"),
        },
    }
}

/// The socket rsvici reads and writes, reporting its end once and then going quiet.
struct WatchedSocket {
    inner: UnixStream,
    lost: watch::Sender<Option<String>>,
    dead: bool,
}

impl WatchedSocket {
    fn die(&mut self, why: String) {
        if !self.dead {
            self.dead = true;
            tracing::debug!(reason = %why, "VICI socket lost");
            self.lost.send_replace(Some(why));
        }
    }
}

impl AsyncRead for WatchedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.dead {
            // Nothing will ever come; staying Pending stops rsvici's reader from spinning.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.die("charon closed the VICI socket".into());
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.die(format!("VICI socket read failed: {e}"));
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for WatchedSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(e)) = &res {
            let why = format!("VICI socket write failed: {e}");
            self.die(why);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
