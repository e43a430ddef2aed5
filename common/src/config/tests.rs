use std::collections::HashMap;

use super::*;

fn hub(text: &str) -> Result<HubConfig, ConfigError> {
    parse_toml::<HubFile>("hub.toml", text)?.validate("hub.toml")
}

#[test]
fn hub_config_errors_name_the_key() {
    let e = hub("id = 1\ndata_dir = \"/x\"\nlisten = \"nope\"").unwrap_err();
    assert!(e.to_string().contains("`listen`"), "{e}");
    let e = hub("id = 0\ndata_dir = \"/x\"").unwrap_err();
    assert!(e.to_string().contains("`id`"), "{e}");
    let e = hub("id = 1\ndata_dir = \"/x\"\nlisten_typo = \"1\"").unwrap_err();
    assert!(e.to_string().contains("listen_typo"), "{e}");
    let ok = hub("id = 1\ndata_dir = \"/x\"\nlisten = \"127.0.0.1:0\"").unwrap();
    assert!(ok.tls_names.contains(&"localhost".to_string()));
}

#[test]
fn the_audit_retention_is_bounded() {
    let base = "id = 1\ndata_dir = \"/x\"\n";
    let ok = hub(base).unwrap();
    assert_eq!(ok.audit, Audit::default());
    let ok = hub(&format!(
        "{base}[audit]\nmax_records = 100000\nretention_s = 60\n"
    ))
    .unwrap();
    assert_eq!((ok.audit.max_records, ok.audit.retention_s), (100_000, 60));
    for bad in ["max_records = 0", "max_records = 100001", "retention_s = 0"] {
        let e = hub(&format!("{base}[audit]\n{bad}\n")).unwrap_err();
        assert!(e.to_string().contains("`audit."), "{bad}: {e}");
    }
    let e = hub(&format!("{base}[audit]\nkeep = 1\n")).unwrap_err();
    assert!(e.to_string().contains("keep"), "{e}");
}

#[test]
fn node_config_errors_name_the_key() {
    let base = "name = \"n1\"\ndata_dir = \"/x\"\nhub = \"https://127.0.0.1:1\"\n";
    let node = |extra: &str| {
        parse_toml::<NodeFile>("node.toml", &format!("{base}{extra}"))
            .and_then(|f| f.validate("node.toml"))
    };
    node("").unwrap();
    let e = node("[[servers]]\nname = \"s\"\ncommand = \"x\"\nmax_concurrency = 0\n").unwrap_err();
    assert!(e.to_string().contains("servers[0].max_concurrency"), "{e}");
    assert_eq!(node("join_token = \"\"\n").unwrap().join_token, None);
    let e = node("join_token = \"abc\"\n").unwrap_err();
    assert!(e.to_string().contains("`join_token`"), "{e}");
    let e = node("otlp_endpoint = \"collector:4318\"\n").unwrap_err();
    assert!(e.to_string().contains("`otlp_endpoint`"), "{e}");
    let ok = node("otlp_endpoint = \"http://collector:4318\"\n").unwrap();
    assert_eq!(ok.otlp_endpoint.as_deref(), Some("http://collector:4318"));
}

#[test]
fn an_otlp_endpoint_is_an_http_address() {
    for good in ["http://127.0.0.1:4318", "http://otel.example:4318/base"] {
        check_otlp_endpoint(good).unwrap();
    }
    for bad in [
        "",
        "http://",
        "grpc://x:4317",
        "127.0.0.1:4318",
        "http://a b",
        "https://otel.example:4318",
    ] {
        assert!(check_otlp_endpoint(bad).is_err(), "{bad}");
    }
    let e = hub("id = 1\ndata_dir = \"/x\"\notlp_endpoint = \"x\"").unwrap_err();
    assert!(e.to_string().contains("`otlp_endpoint`"), "{e}");
}

#[test]
fn client_settings_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.toml");
    std::fs::write(
        &path,
        "hub = \"https://127.0.0.1:1\"\nca = \"/ca.pem\"\ntoken = \"file\"\n",
    )
    .unwrap();
    let mut env = HashMap::new();
    env.insert(ENV_TOKEN.to_string(), "env".to_string());
    let s = ClientSettings::resolve(ClientFile::default(), None, &path, &env).unwrap();
    assert_eq!(s.token, "env");
    assert_eq!(s.hubs, ["https://127.0.0.1:1"]);
    let flags = ClientFile {
        token: Some("flag".into()),
        ..Default::default()
    };
    let s = ClientSettings::resolve(flags, None, &path, &env).unwrap();
    assert_eq!(s.token, "flag");
    assert_eq!(s.identity, None);
    // A client certificate comes with its key, from any of the three places.
    let mut with_cert = env.clone();
    with_cert.insert(ENV_CERT.to_string(), "/a.pem".to_string());
    let e = ClientSettings::resolve(ClientFile::default(), None, &path, &with_cert).unwrap_err();
    assert!(e.to_string().contains("needs its key"), "{e}");
    let flags = ClientFile {
        key: Some("/a.key".into()),
        ..Default::default()
    };
    let s = ClientSettings::resolve(flags, None, &path, &with_cert).unwrap();
    assert_eq!(s.identity, Some(("/a.pem".into(), "/a.key".into())));
    // Several hubs: from a list in the file, or commas in a flag or the environment.
    std::fs::write(
        &path,
        "hubs = [\"https://127.0.0.1:1\", \"https://127.0.0.1:2\"]\nca = \"/ca.pem\"\ntoken = \"t\"\n",
    )
    .unwrap();
    let s = ClientSettings::resolve(ClientFile::default(), None, &path, &HashMap::new()).unwrap();
    assert_eq!(s.hubs, ["https://127.0.0.1:1", "https://127.0.0.1:2"]);
    env.insert(ENV_HUB.to_string(), "https://a:1, https://b:2".to_string());
    let s = ClientSettings::resolve(ClientFile::default(), None, &path, &env).unwrap();
    assert_eq!(s.hubs, ["https://a:1", "https://b:2"]);
    let missing = dir.path().join("absent.toml");
    assert!(
        ClientSettings::resolve(ClientFile::default(), None, &missing, &HashMap::new()).is_err()
    );
}

#[test]
fn the_http_ports_tls_needs_a_certificate_and_key_that_read_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::pki::Ca::generate("t").unwrap();
    let pair = ca.issue_hub("h", &[]).unwrap();
    let other = ca.issue_hub("o", &[]).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, key, wrong_key) = (
        write("c.pem", &pair.cert_pem),
        write("k.pem", &pair.key_pem),
        write("o.pem", &other.key_pem),
    );
    let with = |extra: String| hub(&format!("id = 1\ndata_dir = \"/x\"\n{extra}"));
    let ok = with(format!("http_tls_cert = {cert:?}\nhttp_tls_key = {key:?}")).unwrap();
    assert!(ok.http_tls.is_some());
    assert!(with(String::new()).unwrap().http_tls.is_none());
    let e = with(format!("http_tls_cert = {cert:?}")).unwrap_err();
    assert!(e.to_string().contains("`http_tls_key`: is required"), "{e}");
    let e = with(format!("http_tls_key = {key:?}")).unwrap_err();
    assert!(
        e.to_string().contains("`http_tls_cert`: is required"),
        "{e}"
    );
    let e = with("http_tls_cert = \"/nope.pem\"\nhttp_tls_key = \"/nope.key\"".into()).unwrap_err();
    assert!(e.to_string().contains("/nope.pem"), "{e}");
    // A key that is not the certificate's is refused at start, not at the first request.
    let e = with(format!(
        "http_tls_cert = {cert:?}\nhttp_tls_key = {wrong_key:?}"
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("`http_tls_key`: does not go with"),
        "{e}"
    );
    // A certificate given as the key is named as the key.
    let e = with(format!("http_tls_cert = {cert:?}\nhttp_tls_key = {cert:?}")).unwrap_err();
    assert!(e.to_string().contains("`http_tls_key`"), "{e}");
}

#[test]
fn an_advertised_http_address_has_the_scheme_the_port_serves() {
    let base = "id = 1\ndata_dir = \"/x\"\n";
    let ok = hub(&format!(
        "{base}http_advertise = \"http://hub-1.example:7480/\""
    ))
    .unwrap();
    assert_eq!(
        ok.http_advertise.as_deref(),
        Some("http://hub-1.example:7480")
    );
    for bad in ["hub-1:7480", "https://hub-1:7480", "http://", "http://a b"] {
        let e = hub(&format!("{base}http_advertise = {bad:?}")).unwrap_err();
        assert!(e.to_string().contains("`http_advertise`"), "{bad}: {e}");
    }
}

#[test]
fn environment_variables_fill_in_a_config_file() {
    let env = |name: &str| match name {
        "HOSTNAME" => Some("flotilla-node-7f9c".to_owned()),
        "TOKEN" => Some("flt1.abc".to_owned()),
        _ => None,
    };
    let text = "name = \"${HOSTNAME}\"\njoin_token = \"${TOKEN}\"\nnote = \"$${HOME} and $5\"\n";
    assert_eq!(
        expand_env("node.toml", text, env).unwrap(),
        "name = \"flotilla-node-7f9c\"\njoin_token = \"flt1.abc\"\nnote = \"${HOME} and $5\"\n"
    );
    let e = expand_env("node.toml", "a = 1\nb = \"${NOPE}\"", env).unwrap_err();
    assert!(
        e.to_string().contains("NOPE is not set (used at line 2)"),
        "{e}"
    );
    let e = expand_env("node.toml", "a = 1\n${NOPE} = 2", env).unwrap_err();
    assert!(e.to_string().contains("(used at line 2)"), "{e}");
    // A trailing newline (a value from a file) is dropped; a quote cannot break out.
    let from_file = |name: &str| match name {
        "T" => Some("flt1.abc\n".to_owned()),
        "Q" => Some("x\" = 1\ninjected = \"y".to_owned()),
        _ => None,
    };
    assert_eq!(
        expand_env("n", "t = \"${T}\"", from_file).unwrap(),
        "t = \"flt1.abc\""
    );
    let e = expand_env("n", "t = \"${Q}\"", from_file).unwrap_err();
    assert!(
        e.to_string().contains("Q (used at line 1) holds a quote"),
        "{e}"
    );
    let e = expand_env("node.toml", "b = \"${HOSTNAME\"", env).unwrap_err();
    assert!(e.to_string().contains("without a closing"), "{e}");
    let e = expand_env("node.toml", "b = \"${A-B}\"", env).unwrap_err();
    assert!(e.to_string().contains("not a variable name"), "{e}");
}

#[test]
fn a_statefulset_pod_takes_its_hub_id_from_its_name() {
    assert_eq!(id_from_hostname("flotilla-hub-0"), Ok(1));
    assert_eq!(id_from_hostname("flotilla-hub-12"), Ok(13));
    assert!(id_from_hostname("flotilla-hub").is_err());
    assert!(id_from_hostname("hub").is_err());
    let file = |extra: &str| {
        parse_toml::<HubFile>("hub.toml", &format!("data_dir = \"/x\"\n{extra}")).unwrap()
    };
    let c = file("id_from_hostname = true")
        .validate_on("hub.toml", "flotilla-hub-2")
        .unwrap();
    assert_eq!(c.id, 3);
    let e = file("id = 2\nid_from_hostname = true")
        .validate_on("hub.toml", "h-0")
        .unwrap_err();
    assert!(e.to_string().contains("not both"), "{e}");
    let e = file("id_from_hostname = true")
        .validate_on("hub.toml", "laptop")
        .unwrap_err();
    assert!(e.to_string().contains("`id_from_hostname`"), "{e}");
    let e = file("").validate_on("hub.toml", "h-0").unwrap_err();
    assert!(e.to_string().contains("`id`"), "{e}");
}

#[test]
fn a_hub_in_the_peer_list_is_reached_where_the_list_says() {
    let text = "id_from_hostname = true\ndata_dir = \"/x\"\nlisten = \"0.0.0.0:7443\"\n\
        [[peers]]\nid = 1\napi = \"https://h-0.hubs:7443\"\nraft = \"https://h-0.hubs:7444\"\n\
        [[peers]]\nid = 2\napi = \"https://h-1.hubs:7443\"\nraft = \"https://h-1.hubs:7444\"\n";
    let c = parse_toml::<HubFile>("hub.toml", text)
        .unwrap()
        .validate_on("hub.toml", "h-1")
        .unwrap();
    assert_eq!(c.id, 2);
    assert_eq!(c.advertise, "https://h-1.hubs:7443");
    assert_eq!(c.raft_advertise, "https://h-1.hubs:7444");
    assert!(
        c.tls_names.contains(&"h-1.hubs".to_owned()),
        "{:?}",
        c.tls_names
    );
}

#[test]
fn an_external_issuer_names_one_key_source_and_is_listed_once() {
    let with = |issuers: &str| hub(&format!("id = 1\ndata_dir = \"/x\"\n{issuers}"));
    let one = |iss: &str, source: &str| {
        format!("[[agent_tokens.issuers]]\nissuer = \"{iss}\"\naudience = \"f\"\n{source}\n")
    };
    let ok = with(&one("https://idp", "jwks_url = \"https://idp/keys\"")).unwrap();
    let i = &ok.agent_tokens.issuers[0];
    assert_eq!(
        (i.tenant_claim.as_str(), i.scopes_claim.as_str()),
        ("tenant", "scope")
    );
    with(&one(
        "https://idp",
        "jwks_url = \"http://127.0.0.1:9/keys\"",
    ))
    .unwrap();
    for local in ["http://[::1]:9/keys", "http://localhost/keys"] {
        with(&one("https://idp", &format!("jwks_url = \"{local}\""))).unwrap();
    }
    for remote in [
        "http://127.0.0.1.evil.example/keys",
        "http://localhost.evil.example/keys",
        "http://localhost@evil.example/keys",
        "http://10.0.0.1/keys",
    ] {
        let e = with(&one("https://idp", &format!("jwks_url = \"{remote}\""))).unwrap_err();
        assert!(e.to_string().contains("jwks_url"), "{remote}: {e}");
    }
    for (source, key) in [
        ("", "issuers[0].jwks_file"),
        (
            "jwks_url = \"https://a\"\njwks_file = \"/k\"",
            "issuers[0].jwks_file",
        ),
        (
            "jwks_url = \"http://idp.example/keys\"",
            "issuers[0].jwks_url",
        ),
    ] {
        let e = with(&one("https://idp", source)).unwrap_err();
        assert!(e.to_string().contains(key), "{source}: {e}");
    }
    let e = with(&one("flotilla", "jwks_file = \"/k\"")).unwrap_err();
    assert!(e.to_string().contains("issuers[0].issuer"), "{e}");
    let twice = one("https://idp", "jwks_file = \"/k\"").repeat(2);
    let e = with(&twice).unwrap_err();
    assert!(e.to_string().contains("listed twice"), "{e}");
}

#[test]
fn providers_subject_prefixes_end_with_a_colon_and_never_overlap() {
    let with = |issuers: &str| hub(&format!("id = 1\ndata_dir = \"/x\"\n{issuers}"));
    let one = |iss: &str, prefix: &str| {
        format!(
            "[[agent_tokens.issuers]]\nissuer = \"{iss}\"\naudience = \"f\"\njwks_file = \"/k\"\nsubject_prefix = \"{prefix}\"\n"
        )
    };
    with(&format!(
        "{}{}",
        one("https://a", "corp:"),
        one("https://b", "partner:")
    ))
    .unwrap();
    with(&format!("{}{}", one("https://a", ""), one("https://b", ""))).unwrap();
    for (a, b) in [("corp:", "corp:"), ("corp:", ""), ("c:", "c:x:")] {
        let e = with(&format!("{}{}", one("https://a", a), one("https://b", b))).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{a} {b}: {e}");
    }
    let e = with(&one("https://a", "corp")).unwrap_err();
    assert!(e.to_string().contains("subject_prefix"), "{e}");
}
