//! How messages are defined: each one once, in a table ([`messages!`]) that gives its wire
//! type, its name, the fds it takes and its fields in wire order; the table makes the enum
//! variant, its type number, its name, its encoding and its decoding. A field is encoded
//! by its type ([`Field`]), or, for a string, with the longest length given beside it.

use crate::codec::{CodecError, Reader, Writer};

/// A field type the wire knows: how it is written and read.
pub trait Field: Sized {
    /// Appends the field.
    fn put(&self, w: &mut Writer);
    /// Reads the field called `name`.
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError>;
}

macro_rules! plain_field {
    ($($t:ty => $m:ident),* $(,)?) => {$(
        impl Field for $t {
            fn put(&self, w: &mut Writer) {
                w.$m(*self);
            }
            fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
                r.$m(name)
            }
        }
    )*};
}

plain_field!(u8 => u8, u16 => u16, u32 => u32, u64 => u64, i32 => i32);

impl Field for u128 {
    fn put(&self, w: &mut Writer) {
        w.u64(*self as u64);
        w.u64((*self >> 64) as u64);
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        let lo = r.u64(name)?;
        let hi = r.u64(name)?;
        Ok(u128::from(hi) << 64 | u128::from(lo))
    }
}

impl Field for bool {
    fn put(&self, w: &mut Writer) {
        w.u8(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        match r.u8(name)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(CodecError::BadValue {
                field: name,
                value: value.into(),
            }),
        }
    }
}

/// Defines a direction of messages (see the module): one entry per message,
///
/// ```text
/// /// doc
/// 0x0002 "bind" fds 2..=5 "2 to 5" => Bind {
///     /// doc
///     flags: BindFlags,
///     /// doc
///     name: String [MAX_NAME],
/// },
/// ```
///
/// and generates the enum with `msg_type`, `name`, `known`, and the field coding the
/// direction's `encode_payload`/`decode` use (`encode_fields`, `decode_fields`, `fds`).
macro_rules! messages {
    (
        $(#[$meta:meta])*
        pub enum $Enum:ident {
            $(
                $(#[$vmeta:meta])*
                $code:literal $name:literal $(fds $lo:literal ..= $hi:literal $want:literal)?
                    => $Var:ident $({
                    $(
                        $(#[$fmeta:meta])*
                        $f:ident : $t:ty $([$max:expr])?
                    ),* $(,)?
                })?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $Enum {
            $(
                $(#[$vmeta])*
                $Var $({ $( $(#[$fmeta])* $f: $t ),* })?,
            )*
        }

        impl $Enum {
            /// The wire type.
            pub fn msg_type(&self) -> u16 {
                match self {
                    $( Self::$Var { .. } => $code, )*
                }
            }

            /// A short name for logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Self::$Var { .. } => $name, )*
                }
            }

            /// True if `msg_type` is a message of this direction.
            pub fn known(msg_type: u16) -> bool {
                matches!(msg_type, $($code)|*)
            }

            /// The fds a message of `msg_type` takes, and how to say so.
            fn fds(msg_type: u16) -> (core::ops::RangeInclusive<usize>, &'static str) {
                match msg_type {
                    $( $code => messages!(@fds $($lo ..= $hi $want)?), )*
                    _ => (0..=0, "none"),
                }
            }

            /// Appends the fields, in wire order.
            fn encode_fields(&self, w: &mut Writer) {
                match self {
                    $(
                        #[allow(unused_variables)]
                        Self::$Var $({ $($f),* })? => {
                            $($( messages!(@put w, $f, $t $([$max])?); )*)?
                        }
                    )*
                }
            }

            /// Reads the fields of a message of `msg_type` (`None`: not of this direction).
            fn decode_fields(
                msg_type: u16,
                r: &mut Reader<'_>,
            ) -> Result<Option<Self>, CodecError> {
                Ok(Some(match msg_type {
                    $(
                        $code => Self::$Var $({
                            $( $f: messages!(@get r, $f, $t $([$max])?), )*
                        })?,
                    )*
                    _ => return Ok(None),
                }))
            }
        }
    };
    (@fds) => { (0..=0, "none") };
    (@fds $lo:literal ..= $hi:literal $want:literal) => { ($lo..=$hi, $want) };
    (@put $w:ident, $f:ident, $t:ty [$max:expr]) => { $w.str($f, $max); };
    (@put $w:ident, $f:ident, $t:ty) => { $crate::wire::Field::put($f, $w); };
    (@get $r:ident, $f:ident, $t:ty [$max:expr]) => { $r.str(stringify!($f), $max)? };
    (@get $r:ident, $f:ident, $t:ty) => { <$t as $crate::wire::Field>::get($r, stringify!($f))? };
}

pub(crate) use messages;
