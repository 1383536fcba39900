//! The body of every response: a whole one (JSON, the page, metrics), or a Server-Sent Events
//! stream that goes on until the server ends it or the client goes.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};

use crate::conn::sse::Events;

pub enum Body {
    Full(Full<Bytes>),
    /// No length: hyper sends it chunked (HTTP/1.1) and each event as soon as it is polled.
    Events(Events),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(bytes.into()))
    }
}

/// An empty body (204s, preflights).
impl Default for Body {
    fn default() -> Body {
        Body::full(Bytes::new())
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Full(full) => f.debug_tuple("Full").field(full).finish(),
            Body::Events(_) => f.write_str("Events"),
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full).poll_frame(cx),
            Body::Events(events) => Pin::new(events)
                .poll_next(cx)
                .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Events(_) => SizeHint::default(),
        }
    }
}
