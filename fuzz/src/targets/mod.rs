//! One module per target; each has a `TARGET` and the checks it makes.
pub mod authority;
pub mod authz;
pub mod config;
pub mod identity;
pub mod path;
pub mod route;
pub mod sniff;
pub mod xds;

/// Text from fuzz bytes: valid UTF-8 as is, else lossily (parsers are given `&str` by the proxy).
pub(crate) fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}
