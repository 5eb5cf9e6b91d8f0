//! Framing: every frame is a 4-byte big-endian length followed by one postcard
//! value, at most [`MAX_FRAME_LEN`] bytes. tokio-util's `LengthDelimitedCodec`
//! does the length prefix and refuses oversized frames before reading them;
//! this module adds the postcard step and the typed [`Codec`].

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::MAX_FRAME_LEN;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or a length prefix exceeded [`MAX_FRAME_LEN`].
    #[error("framing: {0}")]
    Io(#[from] std::io::Error),
    /// The frame's bytes are not a valid value of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// A valid value was followed by stray bytes inside the same frame.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
    /// The value encodes to more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
}

/// The length-prefix codec every tincan stream uses.
pub fn length_delimited() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Serializes one value into a frame body (without the length prefix).
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, FrameError> {
    let bytes = postcard::to_stdvec(value)?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok(Bytes::from(bytes))
}

/// Serializes one value into the start of `buf`, without allocating;
/// returns the bytes written. A value that does not fit is an error (and
/// leaves what it wrote of itself in `buf`).
pub fn encode_to_slice<T: Serialize>(value: &T, buf: &mut [u8]) -> Result<usize, FrameError> {
    Ok(postcard::to_slice(value, buf)?.len())
}

/// Parses one frame body; the whole body must be exactly one value.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(value)
}

/// A typed codec: decodes frames into `In`, encodes `Out` (or already encoded
/// frame bodies, see [`Encoded`]) into frames.
pub struct Codec<In, Out> {
    inner: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for Codec<In, Out> {
    fn default() -> Self {
        Self {
            inner: length_delimited(),
            _types: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for Codec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.inner.decode(src)? {
            Some(body) => decode(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for Codec<In, Out> {
    type Error = FrameError;

    /// Serializes straight into `dst` behind a length prefix filled in
    /// afterwards, the format `LengthDelimitedCodec` reads: no buffer of its
    /// own per frame.
    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.extend_from_slice(&[0; LENGTH_PREFIX]);
        let written = postcard::to_extend(&item, Tail(dst)).map(drop);
        let len = dst.len() - start - LENGTH_PREFIX;
        let prefix = match written {
            Ok(()) => u32::try_from(len)
                .ok()
                .filter(|_| len <= MAX_FRAME_LEN)
                .ok_or(FrameError::TooLarge(len)),
            Err(e) => Err(e.into()),
        };
        match prefix {
            Ok(prefix) => {
                dst[start..start + LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
                Ok(())
            }
            Err(e) => {
                dst.truncate(start);
                Err(e)
            }
        }
    }
}

/// Bytes of a frame's length prefix.
const LENGTH_PREFIX: usize = 4;

/// Appends to the end of a buffer (postcard writes through `Extend`).
struct Tail<'a>(&'a mut BytesMut);

impl Extend<u8> for Tail<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// A frame body encoded once and written many times (the tracker's fan-out
/// serializes a presence change once, not once per recipient).
#[derive(Debug, Clone)]
pub struct Encoded<T> {
    body: Bytes,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize> Encoded<T> {
    pub fn new(value: &T) -> Result<Self, FrameError> {
        Ok(Self {
            body: encode(value)?,
            _type: PhantomData,
        })
    }

    /// The frame body (without the length prefix).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Encoded size of the body, without the 4-byte length prefix.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

impl<In, Out> Encoder<Encoded<Out>> for Codec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Encoded<Out>, dst: &mut BytesMut) -> Result<(), FrameError> {
        Ok(self.inner.encode(item.body, dst)?)
    }
}
