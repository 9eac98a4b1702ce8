//! Re-framing of a stored SSE context for replay: the daemon's bytes are cut into events
//! (blocks ending in a blank line), the daemon's own `id:` lines are replaced by the
//! relay's ordinal (`id: 1`, `id: 2`, … within the context) so a client can resume with
//! `Last-Event-ID`, and comment-only blocks (keep-alives) are dropped. The output depends
//! only on the stored bytes, so every client receives byte-identical events; memory is one
//! incomplete event at most (capped, see [`MAX_PENDING_BYTES`]).

use std::fmt::Write;

use bytes::{Bytes, BytesMut};

/// An event larger than this is passed on unframed rather than buffered further.
pub const MAX_PENDING_BYTES: usize = 8 << 20;
/// Capacity the unfinished event's buffer may keep between pieces beyond twice its size.
const KEPT_CAPACITY: usize = 16 << 10;

pub struct SseFramer {
    /// Normalised (`\n`-only) bytes of the event being assembled.
    pending: Vec<u8>,
    /// Bytes of `pending` already searched for a blank line.
    scanned: usize,
    /// The previous input ended in `\r`: a leading `\n` belongs to it.
    after_cr: bool,
    /// Ordinal of the last event seen.
    last_id: u64,
    /// Events up to this ordinal are counted but not emitted (`Last-Event-ID`).
    skip_through: u64,
}

impl SseFramer {
    pub fn new(skip_through: u64) -> SseFramer {
        SseFramer {
            pending: Vec::new(),
            scanned: 0,
            after_cr: false,
            last_id: 0,
            skip_through,
        }
    }

    /// Takes the next piece of the context; returns the complete events it finished. An
    /// event still unfinished when the context ends is dropped, as SSE clients do.
    pub fn push(&mut self, bytes: &[u8]) -> Option<Bytes> {
        self.normalize(bytes);
        // Room for the events and their new `id:` lines, so that the output is not held
        // in an allocation twice its size (a stalled client holds a few of these).
        let mut out = BytesMut::with_capacity(self.pending.len() + self.pending.len() / 8 + 64);
        let mut start = 0;
        let mut from = self.scanned.saturating_sub(1);
        while let Some(offset) = memchr::memmem::find(&self.pending[from..], b"\n\n") {
            let end = from + offset;
            frame(
                &mut self.last_id,
                self.skip_through,
                &self.pending[start..end],
                &mut out,
            );
            start = end + 2;
            from = start;
        }
        self.pending.drain(..start);
        self.scanned = self.pending.len();
        if self.pending.len() > MAX_PENDING_BYTES {
            out.extend_from_slice(&self.pending);
            self.pending.clear();
            self.scanned = 0;
        }
        if out.is_empty() {
            None
        } else if out.capacity() > out.len() + out.len() / 4 + 4096 {
            // Tiny events with long ids outgrew the estimate: keep no slack.
            Some(Bytes::copy_from_slice(&out))
        } else {
            Some(out.freeze())
        }
    }

    /// Gives back the room kept for the next piece, keeping only the unfinished event: for
    /// a framer about to wait (its client stalled), not between every piece.
    pub fn compact(&mut self) {
        if self.pending.capacity() > KEPT_CAPACITY.max(2 * self.pending.len()) {
            self.pending.shrink_to(self.pending.len());
        }
    }

    /// Appends `bytes` to `pending` with `\r\n` and lone `\r` turned into `\n`.
    fn normalize(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        if self.after_cr && rest.first() == Some(&b'\n') {
            rest = &rest[1..];
        }
        self.after_cr = false;
        while let Some(pos) = memchr::memchr(b'\r', rest) {
            self.pending.extend_from_slice(&rest[..pos]);
            self.pending.push(b'\n');
            rest = &rest[pos + 1..];
            match rest.first() {
                None => self.after_cr = true,
                Some(b'\n') => rest = &rest[1..],
                Some(_) => {}
            }
        }
        self.pending.extend_from_slice(rest);
    }
}

/// Appends one event block, numbered, unless it holds only comments or is skipped.
fn frame(last_id: &mut u64, skip_through: u64, block: &[u8], out: &mut BytesMut) {
    // A block can start with an empty line (the third `\n` of `\n\n\n`): that line ends an
    // empty event, so it is not part of this one.
    // Walked twice rather than collected: this runs for every event of every replay.
    let lines = || {
        block
            .split(|&b| b == b'\n')
            .filter(|line| !(line.is_empty() || *line == b"id" || line.starts_with(b"id:")))
    };
    if !lines().any(|line| !line.starts_with(b":")) {
        return;
    }
    *last_id += 1;
    if *last_id <= skip_through {
        return;
    }
    // Into the buffer directly (BytesMut is a fmt::Write), not through a String.
    let _ = writeln!(out, "id: {last_id}");
    for line in lines() {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], skip: u64) -> String {
        let mut framer = SseFramer::new(skip);
        let mut out = Vec::new();
        for piece in pieces {
            if let Some(bytes) = framer.push(piece) {
                out.extend_from_slice(&bytes);
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn frames_with_relay_ids_whatever_the_chunking() {
        let input =
            b"id: 77\ndata: a\n\n: keepalive\n\nevent: x\ndata: b\r\ndata: c\r\n\r\ndata: d";
        // The unfinished `data: d` at the end is dropped, as an SSE client would.
        let expected = "id: 1\ndata: a\n\nid: 2\nevent: x\ndata: b\ndata: c\n\n";
        assert_eq!(run(&[input], 0), expected);
        // Every split point gives the same bytes.
        for split in 0..input.len() {
            assert_eq!(
                run(&[&input[..split], &input[split..]], 0),
                expected,
                "split at {split}"
            );
        }
        let one_byte_pieces: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&one_byte_pieces, 0), expected);
    }

    #[test]
    fn extra_blank_lines_are_empty_events() {
        // Found by the sse_framing fuzz target: the third `\n` of `\n\n\n` used to start
        // the next event with a blank line, which ended it before its data.
        let expected = "id: 1\ndata: a\n\nid: 2\ndata: b\n\n";
        assert_eq!(run(&[b"data: a\n\n\ndata: b\n\n"], 0), expected);
        assert_eq!(
            run(&[b"\n\r\n\rdata: a\r\n\r\n\r\ndata: b\n\n"], 0),
            expected
        );
    }

    #[test]
    fn resumes_after_last_event_id() {
        let input = b"data: a\n\ndata: b\n\ndata: c\n\n";
        assert_eq!(run(&[input], 2), "id: 3\ndata: c\n\n");
        assert_eq!(run(&[input], 3), "");
    }
}
