//! A model's files read through the worker's weight store (`www/weight-store.js`), which does the
//! HTTP Range requests, caching, retries and checks; this side only asks for byte ranges.

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::error::{Error, Result};
use crate::loader::{FileSource, LocalFuture};

/// A JS object with `size(path) -> Promise<number | null>` and
/// `read(path, start, length) -> Promise<Uint8Array>`.
pub struct JsSource {
    store: JsValue,
    base: String,
}

impl JsSource {
    /// Wraps `store`; `base` (the model's URL) is only used in messages.
    pub fn new(store: JsValue, base: String) -> Self {
        Self { store, base }
    }

    async fn call(&self, method: &str, args: &[JsValue]) -> Result<JsValue> {
        let f = js_sys::Reflect::get(&self.store, &JsValue::from_str(method))
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
            .ok_or_else(|| Error::Io(format!("the weight store has no {method}() method")))?;
        let array: js_sys::Array = args.iter().collect();
        let promise = f.apply(&self.store, &array).map_err(js_error)?;
        JsFuture::from(js_sys::Promise::resolve(&promise)).await.map_err(js_error)
    }
}

/// A rejected store promise as the crate's error; an `AbortError` is a cancellation.
pub fn js_error(e: JsValue) -> Error {
    let name = js_sys::Reflect::get(&e, &JsValue::from_str("name")).ok().and_then(|n| n.as_string()).unwrap_or_default();
    if name == "AbortError" {
        return Error::Cancelled;
    }
    let message = js_sys::Reflect::get(&e, &JsValue::from_str("message")).ok().and_then(|m| m.as_string());
    Error::Io(message.or_else(|| e.as_string()).unwrap_or_else(|| format!("{e:?}")))
}

impl FileSource for JsSource {
    fn describe(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            let v = self.call("size", &[JsValue::from_str(path)]).await?;
            Ok(v.as_f64().map(|n| n as u64))
        })
    }
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let v = self.call("read", &[JsValue::from_str(path), JsValue::from_f64(start as f64), JsValue::from_f64(len as f64)]).await?;
            let bytes = v.dyn_into::<js_sys::Uint8Array>().map_err(|_| Error::Io(format!("the weight store returned no bytes for {}", self.describe(path))))?;
            if bytes.length() as u64 != len {
                return Err(Error::Io(format!("{}: asked for {len} bytes at {start}, got {}", self.describe(path), bytes.length())));
            }
            Ok(bytes.to_vec())
        })
    }
}
