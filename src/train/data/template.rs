//! The model's own chat template (from `tokenizer_config.json` or `chat_template.jinja`), rendered
//! with minijinja so the text is byte-identical to transformers' `apply_chat_template`.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;
use std::path::Path;

/// Special tokens and the template a model directory declares.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub eos_token: String,
    pub pad_token: Option<String>,
}

impl ChatTemplate {
    /// Reads `tokenizer_config.json` (and `chat_template.jinja` if present) from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?,
            Err(_) => Json::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path)?)
        } else {
            match &cfg["chat_template"] {
                Json::String(s) => Some(s.clone()),
                // A list of named templates: the one called "default".
                Json::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let token = |k: &str| match &cfg[k] {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let eos_token = token("eos_token")
            .ok_or_else(|| anyhow!("{} declares no eos_token", cfg_path.display()))?;
        Self::new(source, eos_token, token("pad_token"))
    }

    /// `source = None` means the model has no chat template: chat rows are then an error.
    pub fn new(
        source: Option<String>,
        eos_token: String,
        pad_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks + lstrip_blocks and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        if let Some(src) = source {
            env.add_template_owned("chat", src)
                .context("the model's chat_template does not parse")?;
        }
        Ok(Self {
            env,
            eos_token,
            pad_token,
        })
    }

    /// Renders a conversation for training (no generation prompt).
    pub fn render(&self, messages: &[Json], tools: Option<&[Json]>) -> Result<String> {
        let Ok(tmpl) = self.env.get_template("chat") else {
            bail!("the model has no chat_template, so conversational rows cannot be rendered");
        };
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => false,
            eos_token => self.eos_token.clone(),
        };
        tmpl.render(ctx)
            .map_err(|e| anyhow!("chat template failed: {e:#}"))
    }
}

impl ChatTemplate {
    /// Renders a conversation as a generation prompt, as transformers'
    /// `apply_chat_template(..., add_generation_prompt=...)` does; `enable_thinking` is passed to
    /// the template only when given (Qwen3's template tests whether it is defined).
    pub fn render_prompt(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let Ok(tmpl) = self.env.get_template("chat") else {
            bail!("the model has no chat_template, so messages cannot be rendered");
        };
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Json::from(messages.to_vec()));
        if let Some(t) = tools {
            ctx.insert("tools".into(), Json::from(t.to_vec()));
        }
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(e) = enable_thinking {
            ctx.insert("enable_thinking".into(), e.into());
        }
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| anyhow!("chat template failed: {e:#}"))
    }
}

/// Python's `json.dumps(x, ensure_ascii=False)`: insertion order, `", "` and `": "` separators,
/// raw non-ASCII, no HTML escaping, Python float repr.
fn tojson(value: Value) -> Result<Value, Error> {
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, &mut out);
    Ok(Value::from_safe_string(out))
}

pub fn write_py_json(v: &Json, out: &mut String) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&py_float_repr(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Json::String(s) => out.push_str(&serde_json::to_string(s).expect("string serialises")),
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json(x, out);
            }
            out.push(']');
        }
        Json::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(k).expect("string serialises"));
                out.push_str(": ");
                write_py_json(x, out);
            }
            out.push('}');
        }
    }
}

/// `repr(float)` in Python: shortest round-trip digits, positional for 1e-4 <= |x| < 1e16,
/// otherwise `d.ddde±XX`.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "1.5e-5".
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').expect("scientific format");
    let exp: i32 = exp.parse().expect("exponent");
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.5, "1.5"),
            (100.0, "100.0"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-2.5e-7, "-2.5e-07"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let v: Json = serde_json::from_str(
            r#"{"b": 1, "a": [true, null, 2.5], "s": "é<&>'\"\n", "n": {"x": 1e-05}}"#,
        )
        .unwrap();
        let mut out = String::new();
        write_py_json(&v, &mut out);
        assert_eq!(
            out,
            r#"{"b": 1, "a": [true, null, 2.5], "s": "é<&>'\"\n", "n": {"x": 1e-05}}"#
        );
    }
}
