use super::{refs::resolve, *};
use serde_json::json;

#[test]
fn references_resolve_to_values_or_in_place_text() {
    let a = json!({"content": [{"type": "text", "text": "abc"}], "structuredContent": {"n": 3, "xs": [7, 8]}});
    let results: BTreeMap<&str, &Value> = [("a", &a)].into_iter().collect();
    let t = json!({
        "whole": "${steps.a.structured}",
        "n": "${steps.a.structured.n}",
        "second": "${steps.a.structured.xs.1}",
        "text": "got ${steps.a.text} and ${steps.a.structured.n}",
        "plain": "no refs",
        "nested": ["${steps.a.text}"],
    });
    let r = resolve(&t, &results).unwrap();
    assert_eq!(r["whole"], json!({"n": 3, "xs": [7, 8]}));
    assert_eq!(r["n"], json!(3));
    assert_eq!(r["second"], json!(8));
    assert_eq!(r["text"], json!("got abc and 3"));
    assert_eq!(r["plain"], json!("no refs"));
    assert_eq!(r["nested"], json!(["abc"]));
    let err = resolve(&json!("${steps.a.structured.missing}"), &results).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    let err = resolve(&json!("${steps.b.text}"), &results).unwrap_err();
    assert_eq!(err, RefError::NoResult("b".into()));
}

#[test]
fn shape_checks_catch_cycles_unknown_steps_and_undeclared_references() {
    let s = |name: &str, deps: &[&str], args: Value| {
        StepRecord::new(
            name,
            "echo",
            args,
            deps.iter().map(|d| d.to_string()).collect(),
        )
    };
    assert!(check_shape(&[
        s("a", &[], json!({})),
        s("b", &["a"], json!({"x": "${steps.a.text}"}))
    ])
    .is_ok());
    let e = check_shape(&[s("a", &["b"], json!({})), s("b", &["a"], json!({}))]).unwrap_err();
    assert_eq!(e, ShapeError::Cycle(vec!["a".into(), "b".into()]));
    let e = check_shape(&[s("a", &["zz"], json!({}))]).unwrap_err();
    assert!(e.to_string().contains("unknown step"), "{e}");
    let e = check_shape(&[
        s("a", &[], json!({})),
        s("b", &[], json!({"x": "${steps.a.text}"})),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("does not depend"), "{e}");
    let e = check_shape(&[s("a", &[], json!({"x": "${oops}"}))]).unwrap_err();
    assert!(e.to_string().contains("steps."), "{e}");
    let e = check_shape(&[s("a", &[], json!({})), s("a", &[], json!({}))]).unwrap_err();
    assert!(e.to_string().contains("two steps"), "{e}");
    // Transitive dependencies may be referred to.
    assert!(check_shape(&[
        s("a", &[], json!({})),
        s("b", &["a"], json!({})),
        s("c", &["b"], json!({"x": "${steps.a.text}"}))
    ])
    .is_ok());
}
