//! The prost codec every generated client and server uses, with small initial buffers.
//!
//! tonic gives each stream an encode and a decode buffer for its whole life, allocated when
//! the stream starts (8 KiB each by default). kas holds several long-lived streams per
//! agent — two idle reverse tunnels and the configuration stream — that carry a few
//! hundred bytes each while idle, for thousands of agents: the default buffers were most of
//! an idle agent's memory. Buffers still grow to the message being coded (and stay grown
//! for that stream), so large messages cost a reallocation, not a failure.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of each direction's buffer.
pub const BUFFER_BYTES: usize = 512;
/// tonic's default: how much a stream encodes before it yields to send.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The prost codec for requests `E` and responses `D`, with [`BUFFER_BYTES`] buffers.
pub struct LeanCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for LeanCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<E, D> Codec for LeanCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
