//! What a node reads from an MCP server's stdout: a JSON-RPC message, and a tool result the
//! node turns into the bytes it sends the hub. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rmcp::model::{CallToolResult, ServerJsonRpcMessage};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ServerJsonRpcMessage>(data);
    if let Ok(r) = serde_json::from_slice::<CallToolResult>(data) {
        let bytes = serde_json::to_vec(&r).expect("a result serializes");
        let _: serde_json::Value = serde_json::from_slice(&bytes).expect("and reads back");
    }
});
