//! `quiver predict MODEL --entity user_id=u1 [--feature request:amount=12.5]`: one predict
//! against a running server, the answer printed as JSON.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

#[derive(clap::Args)]
pub struct PredictArgs {
    /// The model to ask.
    pub model: String,
    /// Entity keys, `KEY_COLUMN=VALUE` (repeatable).
    #[arg(long = "entity", value_name = "KEY=VALUE")]
    pub entities: Vec<String>,
    /// Request-time values, `request:NAME=NUMBER` or `NAME=NUMBER` (repeatable).
    #[arg(long = "feature", value_name = "NAME=NUMBER")]
    pub features: Vec<String>,
    /// Pin a version instead of the routed one.
    #[arg(long)]
    pub version: Option<u64>,
    /// The server's base URL.
    #[arg(long, env = "QUIVER_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
}

fn pair(s: &str) -> Result<(&str, &str)> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .with_context(|| format!("{s:?} is not NAME=VALUE"))
}

pub fn run(args: PredictArgs) -> Result<()> {
    let mut entities = Map::new();
    for e in &args.entities {
        let (k, v) = pair(e)?;
        entities.insert(k.to_string(), Value::String(v.to_string()));
    }
    let mut features = Map::new();
    for f in &args.features {
        let (k, v) = pair(f)?;
        let name = k.strip_prefix("request:").unwrap_or(k);
        let x: f64 = v
            .parse()
            .with_context(|| format!("--feature {name}: {v:?} is not a number"))?;
        features.insert(name.to_string(), json!(x));
    }
    let mut body = json!({"entities": entities, "features": features});
    if let Some(v) = args.version {
        body["version"] = json!(v);
    }
    let url = format!(
        "{}/v1/models/{}/predict",
        args.url.trim_end_matches('/'),
        args.model
    );
    let resp = reqwest::blocking::Client::new()
        .post(&url)
        .json(&body)
        .send()
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let v: Value = resp.json().context("the reply is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            v["error"]["message"].as_str().unwrap_or("error")
        );
    }
    Ok(())
}
