//! Unit tests of the chat handler's request checks, streaming visibility and tool-call ends.

use super::*;

#[test]
fn the_first_closed_call_is_found_across_pieces_and_not_in_reasoning() {
    let closed = |pieces: &[&str]| {
        let mut f = FirstCall::default();
        pieces.iter().map(|p| f.closed_by(p)).collect::<Vec<_>>()
    };
    assert_eq!(
        closed(&[
            "<tool_call>\n{\"name\": \"f\"}\n</tool",
            "_call>",
            "\n<tool_call>"
        ]),
        [false, true, true]
    );
    // Reasoning that mentions the tag does not end the turn; the call after it does.
    assert_eq!(
        closed(&[
            "<thi",
            "nk>\nwrite </tool_call> then",
            "</think>\n\n",
            "<tool_call>{}</tool_call>"
        ]),
        [false, false, false, true]
    );
    assert_eq!(closed(&["Just text."]), [false]);
}

#[test]
fn only_a_free_turn_without_parallel_calls_ends_at_its_first_call() {
    let req = |v: Value| -> ChatRequest { serde_json::from_value(v).unwrap() };
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let base =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools});
    let ends = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        plan(&req(b)).unwrap().first_call_ends
    };
    assert!(ends(json!({"parallel_tool_calls": false})));
    assert!(!ends(json!({})));
    assert!(!ends(json!({"parallel_tool_calls": true})));
    // Forced: the opening ends after one call already.
    assert!(!ends(
        json!({"parallel_tool_calls": false, "tool_choice": "required"})
    ));
    // No tools offered to the model.
    assert!(!ends(
        json!({"parallel_tool_calls": false, "tool_choice": "none"})
    ));
}

#[test]
fn visible_content_grows_and_hides_tags() {
    assert_eq!(visible_content("<thi", true), "");
    assert_eq!(visible_content("<think>\nhm", true), "");
    assert_eq!(visible_content("<think>\n\n</think>\n\nHel", true), "Hel");
    assert_eq!(visible_content("Hello <tool_", true), "Hello");
    assert_eq!(visible_content("Hello <tool_", false), "Hello <tool_");
    assert_eq!(visible_content("Hi\n<tool_call>\n{\"name\"", true), "Hi");
}

#[test]
fn requests_are_checked() {
    let req = |v: Value| -> ChatRequest { serde_json::from_value(v).unwrap() };
    let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert!(plan(&req(base.clone())).is_ok());
    for (field, value) in [
        ("n", json!(2)),
        ("temperature", json!(3)),
        ("top_p", json!(0)),
        ("max_completion_tokens", json!(0)),
        ("tool_choice", json!("required")),
        ("tool_choice", json!("always")),
        ("stop", json!(["a", "b", "c", "d", "e"])),
    ] {
        let mut b = base.clone();
        b[field] = value;
        let e = plan(&req(b)).err().expect(field);
        assert_eq!(e.into_response().status(), 400, "{field}");
    }
    let parts = json!({"model": "m", "messages": [{"role": "developer",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
    let p = plan(&req(parts)).unwrap();
    assert_eq!(p.messages[0], json!({"role": "system", "content": "ab"}));
}
