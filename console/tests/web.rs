//! The page's files obey the CSP sync-server sends with them: no inline
//! script or style, nothing loaded from another origin.

use std::path::Path;

fn web(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("web").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_page_has_no_inline_script_or_style_and_no_outside_url() {
    let html = web("index.html").to_lowercase();
    for tag in html.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap_or_default();
        assert!(open.contains("src="), "an inline <script>: <script{open}>");
        assert!(
            tag.split('>')
                .nth(1)
                .unwrap_or_default()
                .starts_with("</script"),
            "a <script> with a body"
        );
    }
    assert!(!html.contains("<style"), "an inline <style>");
    assert!(!html.contains(" style="), "an inline style attribute");
    let handler = html.split(" on").skip(1).find(|rest| {
        let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        !name.is_empty() && rest[name.len()..].starts_with('=')
    });
    assert!(handler.is_none(), "an inline event handler: on{handler:?}");
    for file in ["index.html", "console.js", "console.css"] {
        let text = web(file);
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{file} names another origin"
        );
    }
    let js = web("console.js");
    assert!(
        !js.contains("innerHTML") && !js.contains("eval("),
        "console.js builds the DOM from text only"
    );
    assert!(
        !js.contains("localStorage."),
        "the token must not outlive the tab"
    );
    assert!(
        !js.contains("setAttribute(\"style\""),
        "inline styles are blocked by the CSP"
    );
}
