//! What the example apps answer: bodies `<kind>:<pid>` (hello `Hello:123`, the buildapp
//! fixture `build-2:123`) or plain text (`Hello from angel-host`).

/// The pid in a `<kind>:<pid>` body, if it names one.
pub fn body_pid(body: &str) -> Option<i32> {
    body.rsplit_once(':')
        .and_then(|(_, pid)| pid.trim().parse().ok())
}

/// The pid in a hello response body; panics unless the body is `<message>:<pid>`.
pub fn hello_pid(body: &str) -> i32 {
    body_pid(body).unwrap_or_else(|| panic!("hello body {body:?} is not `<message>:<pid>`"))
}

/// What kind of answer a body is: the text before its first `:` (`Hello:123` → `Hello`,
/// `build-2:123` → `build-2`), or the whole trimmed body (`Hello from angel-host`).
pub fn body_kind(body: &str) -> String {
    let body = body.trim();
    body.split_once(':').map_or(body, |(k, _)| k).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse() {
        assert_eq!(body_pid("Hello:123"), Some(123));
        assert_eq!(body_pid("build-2:77\n"), Some(77));
        assert_eq!(body_pid("Hello from angel-host\n"), None);
        assert_eq!(hello_pid("Hello:123"), 123);
        assert_eq!(body_kind("Hello:123"), "Hello");
        assert_eq!(body_kind("build-2:77\n"), "build-2");
        assert_eq!(
            body_kind("Hello from angel-host\n"),
            "Hello from angel-host"
        );
    }
}
