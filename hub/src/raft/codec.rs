//! How the hub reads back what it stored or replicated: log entries, snapshots and Raft
//! messages. serde_json's default parser refuses documents nested deeper than 128 levels,
//! so an accepted input wrapped in a few more levels (a command inside an entry inside an
//! AppendEntries request) could be written but never read again, stopping Raft for good.
//! Everything committed is therefore decoded without that limit, on a stack that grows as
//! needed (`serde_stacker`). Input limits (`flotilla_common::limits`) keep documents far
//! below any depth where this matters; this is the guarantee that no accepted input can
//! make a committed entry unreadable.

use serde::de::DeserializeOwned;

/// Decodes JSON of any nesting depth.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = T::deserialize(serde_stacker::Deserializer::new(&mut de))?;
    de.end()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn reads_documents_deeper_than_serde_json_allows() {
        let doc = nested(1_000);
        assert!(serde_json::from_str::<serde_json::Value>(&doc).is_err());
        let v: serde_json::Value = decode(doc.as_bytes()).expect("decodes");
        let mut at = &v;
        let mut depth = 0;
        while let Some(inner) = at.get("a") {
            at = inner;
            depth += 1;
        }
        assert_eq!(depth, 1_000);
    }

    #[test]
    fn refuses_trailing_garbage() {
        assert!(decode::<serde_json::Value>(b"{} x").is_err());
    }
}
