//! Makes the `:authority` that standard gRPC clients send on a Unix socket acceptable to the
//! HTTP/2 server under tonic.
//!
//! grpc-core (Python, C++, Ruby, PHP) sends the socket path percent-encoded
//! (`tmp%2Fvipsec%2Fagent.sock`), grpc-java and Bazel send the raw path
//! (`/run/vipsec/agent.sock`); grpc-go sends `localhost`. `h2`'s server parses `:authority`
//! as a URI authority and resets the stream with PROTOCOL_ERROR when that fails
//! (hyperium/h2#442, pull request #487 still open), so those clients could not call the
//! agent without setting `grpc.default_authority` by hand.
//!
//! On a Unix socket the authority names nothing: the agent serves one host. So each accepted
//! Unix connection is read through [`AuthorityFix`], which decodes every header block the
//! client sends (HPACK, with the client's dynamic table), replaces an `:authority` that is
//! not a valid URI authority with `localhost`, and hands h2 the block re-encoded with
//! literals only. h2's decoder then never sees the client's dynamic table at all (its own
//! stays empty), so the two can never disagree, whatever the client indexes. Every other
//! frame passes through byte for byte. A connection that does not start with the HTTP/2
//! preface is passed through untouched (h2 refuses it as it would anyway).
//!
//! Patching h2 would be the smaller change in code but a fork of the whole HTTP/2 stack to
//! carry; this adapter only needs the HPACK codec (`loona-hpack`) and the frame layout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer must accept frames this large (RFC 9113 §4.2): re-encoded blocks are
/// cut at this size, whatever the server advertised.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The HPACK dynamic table size the server allows the client (h2's default, which hyper
/// and tonic keep): a larger size update is the client's error.
const HEADER_TABLE_SIZE: usize = 4096;
/// The largest header block (all its frames) held for decoding. h2 refuses header lists
/// above 16 KiB by default, so this only bounds memory for a client that never ends one.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What replaces an authority h2 cannot parse.
pub const UNIX_AUTHORITY: &str = "localhost";

/// Where the transcoder is in the client's byte stream.
enum State {
    /// Comparing the first bytes with the HTTP/2 preface; `seen` bytes matched so far.
    Preface { seen: usize },
    /// Waiting for the next 9-byte frame header.
    FrameHeader,
    /// Copying the rest of a frame that needs no change.
    Passthrough { remaining: usize },
    /// Collecting a HEADERS frame's payload (`remaining` bytes still to come).
    HeadersPayload { remaining: usize },
    /// Not HTTP/2 (no preface): everything passes unchanged.
    Raw,
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    flags: u8,
    /// The HEADERS frame's payload as received (pad length, priority, fragment, padding).
    first_payload: Vec<u8>,
    /// The HEADERS frame is complete; what follows are CONTINUATION fragments.
    first_done: bool,
    /// The block fragment(s) gathered so far.
    block: Vec<u8>,
}

/// The client-to-server half of the rewrite, without I/O: bytes in, bytes for h2 out.
pub struct AuthorityTranscoder {
    state: State,
    input: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
    /// Authorities replaced on this connection (for the log, once).
    pub replaced: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("HPACK decoding failed: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
    #[error("HTTP/2 framing: {0}")]
    Framing(String),
}

impl From<TranscodeError> for io::Error {
    fn from(e: TranscodeError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl Default for AuthorityTranscoder {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityTranscoder {
    pub fn new() -> AuthorityTranscoder {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        AuthorityTranscoder {
            state: State::Preface { seen: 0 },
            input: Vec::new(),
            decoder,
            pending: None,
            replaced: 0,
        }
    }

    /// Takes bytes the client sent and appends to `out` what h2 should read. Bytes that do
    /// not complete a unit yet are kept for the next call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), TranscodeError> {
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            let avail = &self.input[pos..];
            match self.state {
                State::Raw => {
                    out.extend_from_slice(avail);
                    pos = self.input.len();
                    break;
                }
                State::Preface { seen } => {
                    if avail.is_empty() {
                        break;
                    }
                    let n = avail.len().min(PREFACE.len() - seen);
                    if avail[..n] != PREFACE[seen..seen + n] {
                        self.state = State::Raw;
                        continue;
                    }
                    out.extend_from_slice(&avail[..n]);
                    pos += n;
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface { seen: seen + n }
                    };
                }
                State::Passthrough { remaining } => {
                    if remaining == 0 {
                        self.state = State::FrameHeader;
                        continue;
                    }
                    if avail.is_empty() {
                        break;
                    }
                    let n = avail.len().min(remaining);
                    out.extend_from_slice(&avail[..n]);
                    pos += n;
                    self.state = State::Passthrough {
                        remaining: remaining - n,
                    };
                }
                State::FrameHeader => {
                    if avail.len() < FRAME_HEADER_LEN {
                        break;
                    }
                    let head: [u8; FRAME_HEADER_LEN] =
                        avail[..FRAME_HEADER_LEN].try_into().expect("nine bytes");
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let kind = head[3];
                    let flags = head[4];
                    let stream_id =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    if let Some(p) = &self.pending
                        && (kind != CONTINUATION || stream_id != p.stream_id)
                    {
                        return Err(TranscodeError::Framing(format!(
                            "frame type {kind:#x} on stream {stream_id} inside the header block of stream {}",
                            p.stream_id
                        )));
                    }
                    match kind {
                        HEADERS => {
                            if len > MAX_HEADER_BLOCK {
                                return Err(TranscodeError::Framing(format!(
                                    "HEADERS frame of {len} bytes"
                                )));
                            }
                            pos += FRAME_HEADER_LEN;
                            self.pending = Some(PendingBlock {
                                stream_id,
                                flags,
                                first_payload: Vec::with_capacity(len),
                                first_done: false,
                                block: Vec::new(),
                            });
                            self.state = State::HeadersPayload { remaining: len };
                        }
                        CONTINUATION if self.pending.is_some() => {
                            let p = self.pending.as_mut().expect("checked");
                            if p.block.len() + len > MAX_HEADER_BLOCK {
                                return Err(TranscodeError::Framing(format!(
                                    "header block above {MAX_HEADER_BLOCK} bytes"
                                )));
                            }
                            // The continuation's END_HEADERS ends the block.
                            p.flags |= flags & FLAG_END_HEADERS;
                            pos += FRAME_HEADER_LEN;
                            self.state = State::HeadersPayload { remaining: len };
                        }
                        _ => {
                            // Includes a stray CONTINUATION and a client's PUSH_PROMISE:
                            // h2 refuses both as connection errors, unchanged.
                            out.extend_from_slice(&head);
                            pos += FRAME_HEADER_LEN;
                            self.state = State::Passthrough { remaining: len };
                        }
                    }
                }
                State::HeadersPayload { remaining } => {
                    if remaining > 0 && avail.is_empty() {
                        break;
                    }
                    let n = avail.len().min(remaining);
                    let p = self.pending.as_mut().expect("a header block is pending");
                    // The HEADERS frame's payload is kept whole until it is complete (its
                    // padding and priority fields are then unwrapped); continuations are
                    // pure fragments.
                    if p.first_done {
                        p.block.extend_from_slice(&avail[..n]);
                    } else {
                        p.first_payload.extend_from_slice(&avail[..n]);
                    }
                    pos += n;
                    if remaining > n {
                        self.state = State::HeadersPayload {
                            remaining: remaining - n,
                        };
                        continue;
                    }
                    self.state = State::FrameHeader;
                    if !p.first_done {
                        p.block = headers_fragment(p.flags, &p.first_payload)?;
                        p.first_payload = Vec::new();
                        p.first_done = true;
                    }
                    if p.flags & FLAG_END_HEADERS != 0 {
                        let p = self.pending.take().expect("pending");
                        self.emit_block(p, out)?;
                    }
                }
            }
        }
        self.input.drain(..pos);
        Ok(())
    }

    /// Decodes a complete header block, fixes its authority and writes it as HEADERS (and
    /// CONTINUATION) frames of literals.
    fn emit_block(&mut self, p: PendingBlock, out: &mut Vec<u8>) -> Result<(), TranscodeError> {
        let mut encoded = Vec::with_capacity(p.block.len() + 64);
        let mut replaced = 0;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    replaced += 1;
                    UNIX_AUTHORITY.as_bytes()
                } else {
                    &value
                };
                // Literal header field without indexing, new name (RFC 7541 §6.2.2).
                encoded.push(0x00);
                write_string(&name, &mut encoded);
                write_string(value, &mut encoded);
            })
            .map_err(TranscodeError::Hpack)?;
        self.replaced += replaced;
        let mut chunks = encoded.chunks(MIN_MAX_FRAME_SIZE).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let (kind, mut flags) = if first {
                (HEADERS, p.flags & FLAG_END_STREAM)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            write_frame_header(chunk.len(), kind, flags, p.stream_id, out);
            out.extend_from_slice(chunk);
            first = false;
            if last {
                break;
            }
        }
        Ok(())
    }
}

/// The header block fragment inside a HEADERS frame's payload (padding and the priority
/// fields removed: the priority scheme of RFC 7540 is deprecated and h2 ignores it).
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<Vec<u8>, TranscodeError> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(*payload.first().ok_or_else(|| {
            TranscodeError::Framing("padded HEADERS frame without a pad length".into())
        })?);
        start = 1;
        end = end
            .checked_sub(pad)
            .filter(|e| *e >= start)
            .ok_or_else(|| {
                TranscodeError::Framing("HEADERS padding longer than the frame".into())
            })?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
        if start > end {
            return Err(TranscodeError::Framing(
                "HEADERS frame too short for its priority".into(),
            ));
        }
    }
    Ok(payload[start..end].to_vec())
}

/// What h2 accepts as `:authority` (it parses it with the `http` crate).
fn valid_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

fn write_string(s: &[u8], out: &mut Vec<u8>) {
    // Plain (not Huffman) octets: a local socket gains nothing from compression.
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out).expect("writing to a Vec");
    out.extend_from_slice(s);
}

fn write_frame_header(len: usize, kind: u8, flags: u8, stream_id: u32, out: &mut Vec<u8>) {
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// An accepted connection whose client-to-server bytes go through [`AuthorityTranscoder`].
pub struct AuthorityFix<S> {
    inner: S,
    transcoder: AuthorityTranscoder,
    /// Transcoded bytes not yet handed to h2.
    ready: Vec<u8>,
    ready_pos: usize,
    logged: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            transcoder: AuthorityTranscoder::new(),
            ready: Vec::new(),
            ready_pos: 0,
            logged: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_pos);
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut raw_buf = ReadBuf::new(&mut raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf))?;
            let filled = raw_buf.filled();
            if filled.is_empty() {
                // End of stream: whatever was held back was an incomplete frame.
                return Poll::Ready(Ok(()));
            }
            this.transcoder.feed(filled, &mut this.ready)?;
            if this.transcoder.replaced > 0 && !this.logged {
                this.logged = true;
                tracing::debug!(
                    replacement = UNIX_AUTHORITY,
                    "client sent an :authority h2 cannot parse (a socket path); replaced it"
                );
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame_header(payload.len(), kind, flags, stream, &mut v);
        v.extend_from_slice(payload);
        v
    }

    /// Splits h2-bound output into frames and decodes every header block with a fresh
    /// decoder, as h2 would.
    type Frames = Vec<(u8, u8, u32)>;
    type Blocks = Vec<Vec<(String, String)>>;

    fn decode_output(out: &[u8]) -> (Frames, Blocks) {
        assert!(out.starts_with(PREFACE), "preface passes through");
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        let mut blocks = Vec::new();
        let mut decoder = loona_hpack::Decoder::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            let payload = &rest[9..9 + len];
            frames.push((kind, flags, stream));
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & FLAG_END_HEADERS != 0 {
                    let h = decoder.decode(&block).unwrap();
                    blocks.push(
                        h.into_iter()
                            .map(|(n, v)| {
                                (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                            })
                            .collect(),
                    );
                    block.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        (frames, blocks)
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/vipsec.v1.Agent/GetStatus".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
        ]
    }

    fn authority_of(block: &[(String, String)]) -> &str {
        &block.iter().find(|(n, _)| n == ":authority").unwrap().1
    }

    #[test]
    fn socket_path_authorities_become_localhost_and_indexed_ones_stay_consistent() {
        // The client's encoder indexes the authority on the first request and refers to its
        // dynamic table entry on the second: the transcoder must follow that table.
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (stream, authority) in [
            (1, "tmp%2Fvipsec%2Fagent.sock"),
            (3, "tmp%2Fvipsec%2Fagent.sock"),
            (5, "/run/vipsec/agent.sock"),
            (7, "localhost"),
            (9, "agent.example:8443"),
        ] {
            let req = request(authority);
            let block = enc.encode(req.iter().map(|(n, v)| (*n, v.as_slice())));
            input.extend(frame(HEADERS, FLAG_END_HEADERS, stream, &block));
            input.extend(frame(0x0, FLAG_END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        // Fed a byte at a time: every state must survive a split anywhere.
        let mut t = AuthorityTranscoder::new();
        let mut out = Vec::new();
        for b in &input {
            t.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        let (frames, blocks) = decode_output(&out);
        let got: Vec<&str> = blocks.iter().map(|b| authority_of(b)).collect();
        assert_eq!(
            got,
            [
                "localhost",
                "localhost",
                "localhost",
                "localhost",
                "agent.example:8443"
            ]
        );
        assert_eq!(t.replaced, 3);
        assert_eq!(
            blocks[0][2],
            (":path".into(), "/vipsec.v1.Agent/GetStatus".into())
        );
        // SETTINGS, then HEADERS + DATA per request, in order and with their flags.
        assert_eq!(frames[0], (0x4, 0, 0));
        assert_eq!(frames[1], (HEADERS, FLAG_END_HEADERS, 1));
        assert_eq!(frames[2], (0x0, FLAG_END_STREAM, 1));
        assert_eq!(frames.len(), 11);
    }

    #[test]
    fn padding_priority_and_continuations_are_unwrapped() {
        let mut enc = loona_hpack::Encoder::new();
        let mut req = request("%2Fx.sock");
        // A large header forces the re-encoded block over one frame.
        req.push((b"x-big", vec![b'a'; 20_000]));
        let block = enc.encode(req.iter().map(|(n, v)| (*n, v.as_slice())));
        let (a, b) = block.split_at(10);
        let mut payload = vec![3u8]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority: dependency 0, weight 16
        payload.extend_from_slice(a);
        payload.extend([0, 0, 0]); // padding
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            1,
            &payload,
        ));
        input.extend(frame(CONTINUATION, FLAG_END_HEADERS, 1, b));
        let mut t = AuthorityTranscoder::new();
        let mut out = Vec::new();
        t.feed(&input, &mut out).unwrap();
        let (frames, blocks) = decode_output(&out);
        assert_eq!(authority_of(&blocks[0]), "localhost");
        assert_eq!(blocks[0].last().unwrap().1.len(), 20_000);
        assert_eq!(frames[0], (HEADERS, FLAG_END_STREAM, 1));
        assert_eq!(frames[1], (CONTINUATION, FLAG_END_HEADERS, 1));
    }

    #[test]
    fn a_frame_between_a_block_and_its_continuation_is_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        let mut out = Vec::new();
        assert!(AuthorityTranscoder::new().feed(&input, &mut out).is_err());
    }

    #[test]
    fn a_connection_without_the_preface_passes_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: /a/b\r\n\r\n";
        let mut out = Vec::new();
        let mut t = AuthorityTranscoder::new();
        t.feed(&input[..3], &mut out).unwrap();
        t.feed(&input[3..], &mut out).unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn a_table_size_above_what_the_server_allows_is_refused() {
        let mut input = PREFACE.to_vec();
        // Dynamic table size update to 1 MiB, then an indexed :method.
        let mut block = Vec::new();
        loona_hpack::encoder::encode_integer_into(1 << 20, 5, 0x20, &mut block).unwrap();
        block.push(0x82);
        input.extend(frame(HEADERS, FLAG_END_HEADERS, 1, &block));
        let mut out = Vec::new();
        assert!(AuthorityTranscoder::new().feed(&input, &mut out).is_err());
    }
}
