//! What executes commands: the [`CommandHandler`] trait a Rust daemon implements to speak
//! the sync protocol natively, and the [`Outcome`] it answers with. `syncrelay agent` uses
//! the HTTP target handler (`target`) that forwards to a local HTTP daemon.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// A command as the relay handed it out.
#[derive(Debug, Clone)]
pub struct Command {
    pub id: String,
    /// `http` for mirrored calls, else a named method such as `getApproval`.
    pub method: String,
    pub params: serde_json::Value,
    /// The client wants the response body streamed in chunks (cache-and-serve).
    pub stream: bool,
}

/// How a command ended.
pub enum Outcome {
    /// A result, posted as `result`.
    Result(serde_json::Value),
    /// A failure, posted as `error: {code, message}`. The relay shows `timeout` as 504 and
    /// any other code as 502.
    Error { code: String, message: String },
    /// A response whose body is posted as it is read, chunk by chunk.
    Stream(StreamReply),
}

impl Outcome {
    pub fn error(code: &str, message: impl Into<String>) -> Outcome {
        Outcome::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// The head of a streamed response and its body, read incrementally.
pub struct StreamReply {
    pub status: u16,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: BoxStream<'static, Result<Bytes, String>>,
}

/// Executes commands. Called concurrently, up to the agent's `concurrency`.
pub trait CommandHandler: Send + Sync + 'static {
    fn handle(&self, command: Command) -> BoxFuture<'static, Outcome>;
}
