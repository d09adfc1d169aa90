//! tonic's prost codec with small buffers. tonic gives every stream an 8 KiB encode and an
//! 8 KiB decode buffer for its whole life; an idle tunnel (or an agent's configuration
//! stream) carries a few hundred bytes, and a load generator holds tens of thousands of
//! them. The buffers still grow when a message needs more.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer size of each direction.
pub const BUFFER_BYTES: usize = 512;
/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The prost codec for requests `E` and responses `D`, with [`BUFFER_BYTES`] buffers.
pub struct SmallCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for SmallCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<E, D> Codec for SmallCodec<E, D>
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
