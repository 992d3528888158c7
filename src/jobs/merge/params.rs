//! Merge parameters as mergekit resolves them for one tensor: a scalar, a
//! gradient over the layers, or a list of `{filter, value}` entries (the
//! first whose filter is a substring of the tensor name wins; none that
//! matches falls through to the next scope); per-model parameters before
//! the top-level ones.

use crate::error::{Error, Result};
use regex::Regex;
use std::sync::OnceLock;
use yaml_rust2::Yaml;

/// A parameter's value as written.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// Anchors interpolated over the layers (embeddings and head at the
    /// first).
    Gradient(Vec<f64>),
    /// `{filter, value}` entries in order; a filter of None or "*"
    /// matches every tensor.
    Filtered(Vec<(Option<String>, ParamValue)>),
}

fn number(y: &Yaml) -> Option<f64> {
    match y {
        Yaml::Integer(i) => Some(*i as f64),
        // .nan and .inf included, so that they are refused by name.
        Yaml::Real(_) => y.as_f64(),
        _ => None,
    }
}

impl ParamValue {
    /// Parses a value at key path `path`.
    pub fn parse(y: &Yaml, path: &str) -> Result<ParamValue> {
        let bad = |why: &str| Error::input(format!("{path}: {why}"));
        match y {
            Yaml::Boolean(b) => Ok(ParamValue::Bool(*b)),
            Yaml::Array(items) if items.is_empty() => Err(bad("an empty list")),
            Yaml::Array(items) if items.iter().all(|i| number(i).is_some()) => {
                let v: Vec<f64> = items.iter().filter_map(number).collect();
                finite(&v, path)?;
                Ok(ParamValue::Gradient(v))
            }
            Yaml::Array(items) if items.iter().any(|i| number(i).is_some()) => Err(bad(
                "a list that mixes numbers (a gradient) and {filter, value} entries",
            )),
            Yaml::Array(items) => {
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let Yaml::Hash(h) = it else {
                        return Err(Error::input(format!(
                            "{p}: expected a number (a gradient) or {{filter: TEXT, value: V}}"
                        )));
                    };
                    let (mut filter, mut value) = (None, None);
                    for (k, v) in h {
                        match k.as_str() {
                            Some("filter") => match v {
                                Yaml::String(s) => filter = Some(s.clone()),
                                Yaml::Null => {}
                                _ => {
                                    return Err(Error::input(format!("{p}.filter: expected text")))
                                }
                            },
                            Some("value") => {
                                let pv = ParamValue::parse(v, &format!("{p}.value"))?;
                                if matches!(pv, ParamValue::Filtered(_)) {
                                    return Err(Error::input(format!(
                                        "{p}.value: filters do not nest"
                                    )));
                                }
                                value = Some(pv);
                            }
                            _ => {
                                return Err(Error::input(format!(
                                    "{p}: unknown key {k:?} (expected filter, value)"
                                )))
                            }
                        }
                    }
                    let value = value.ok_or_else(|| Error::input(format!("{p}: no value")))?;
                    out.push((filter.filter(|f| f != "*"), value));
                }
                Ok(ParamValue::Filtered(out))
            }
            y => match number(y) {
                Some(v) => {
                    finite(&[v], path)?;
                    Ok(ParamValue::Num(v))
                }
                None => Err(bad(
                    "expected a number, true/false, a list of numbers or of {filter, value}",
                )),
            },
        }
    }

    /// The value for tensor `name` at layer position `t` (0..=1), or None
    /// when a filter list has no entry for it.
    pub fn resolve(&self, name: &str, t: f64) -> Option<Resolved> {
        match self {
            ParamValue::Bool(b) => Some(Resolved::Bool(*b)),
            ParamValue::Num(v) => Some(Resolved::Num(*v)),
            ParamValue::Gradient(a) => Some(Resolved::Num(interpolate(a, t))),
            ParamValue::Filtered(entries) => entries
                .iter()
                .find(|(f, _)| f.as_deref().is_none_or(|f| name.contains(f)))
                .and_then(|(_, v)| v.resolve(name, t)),
        }
    }
}

fn finite(v: &[f64], path: &str) -> Result<()> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::input(format!("{path}: values must be finite")));
    }
    Ok(())
}

/// A resolved value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resolved {
    /// true / false.
    Bool(bool),
    /// A number.
    Num(f64),
}

/// Anchors at evenly spaced positions over [0, 1], linearly interpolated.
pub fn interpolate(anchors: &[f64], t: f64) -> f64 {
    if anchors.len() == 1 {
        return anchors[0];
    }
    let scaled = t.clamp(0.0, 1.0) * (anchors.len() - 1) as f64;
    let i = (scaled.floor() as usize).min(anchors.len() - 2);
    let f = scaled - i as f64;
    anchors[i] * (1.0 - f) + anchors[i + 1] * f
}

/// Named parameters, in the order written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(Vec<(String, ParamValue)>);

impl Params {
    /// Sets `key` (YAML has already refused duplicates).
    pub fn insert(&mut self, key: &str, v: ParamValue) {
        self.0.push((key.to_string(), v));
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&ParamValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The keys set.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

/// Resolves `key` for a tensor through `scopes`, most specific first.
pub fn lookup(scopes: &[&Params], key: &str, name: &str, t: f64) -> Option<Resolved> {
    scopes
        .iter()
        .find_map(|s| s.get(key).and_then(|v| v.resolve(name, t)))
}

fn layer_regex() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    // Cannot fail: a constant pattern, compiled by every test that resolves
    // a gradient.
    R.get_or_init(|| Regex::new(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.").expect("regex"))
}

/// The transformer layer a tensor belongs to (`model.layers.7.…` → 7).
pub fn layer_of(name: &str) -> Option<usize> {
    layer_regex().captures(name).and_then(|c| c[1].parse().ok())
}

/// `name` moved to layer `i` (`model.layers.7.x`, 2 → `model.layers.2.x`);
/// None for a tensor outside the layers.
pub fn with_layer(name: &str, i: usize) -> Option<String> {
    let m = layer_regex().captures(name)?.get(1)?;
    Some(format!("{}{i}{}", &name[..m.start()], &name[m.end()..]))
}

/// A tensor's position for gradients: layer i of L at i/(L − 1) (1 when
/// L = 1); tensors outside the layers (embeddings, final norm, head) at 0.
pub fn position(name: &str, layers: usize) -> f64 {
    match layer_of(name) {
        Some(i) if layers > 1 => i as f64 / (layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::YamlLoader;

    fn parse(s: &str) -> ParamValue {
        ParamValue::parse(&YamlLoader::load_from_str(s).unwrap()[0], "p").unwrap()
    }

    #[test]
    fn gradients_filters_and_precedence() {
        assert_eq!(interpolate(&[0.0, 1.0], 0.25), 0.25);
        assert_eq!(interpolate(&[1.0, 0.7, 0.1], 0.0), 1.0);
        assert_eq!(interpolate(&[1.0, 0.7, 0.1], 0.5), 0.7);
        assert!((interpolate(&[1.0, 0.7, 0.1], 0.75) - 0.4).abs() < 1e-12);
        assert_eq!(interpolate(&[1.0, 0.7, 0.1], 1.0), 0.1);
        assert_eq!(interpolate(&[0.3], 0.9), 0.3);
        assert_eq!(position("model.layers.3.mlp.up_proj.weight", 4), 1.0);
        assert_eq!(position("model.layers.1.mlp.up_proj.weight", 5), 0.25);
        assert_eq!(position("model.embed_tokens.weight", 5), 0.0);
        assert_eq!(position("lm_head.weight", 5), 0.0);
        assert_eq!(position("model.layers.0.x", 1), 1.0);
        assert_eq!(
            with_layer("model.layers.17.mlp.up_proj.weight", 3).as_deref(),
            Some("model.layers.3.mlp.up_proj.weight")
        );
        assert_eq!(
            with_layer("transformer.h.0.attn.c_attn.weight", 12).as_deref(),
            Some("transformer.h.12.attn.c_attn.weight")
        );
        assert_eq!(with_layer("lm_head.weight", 3), None);
        let g = parse("[0, 1]");
        assert_eq!(
            g.resolve("model.layers.2.self_attn.q_proj.weight", 0.5),
            Some(Resolved::Num(0.5))
        );
        let f = parse("[{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.2}]");
        assert_eq!(
            f.resolve("model.layers.1.self_attn.o.weight", 1.0),
            Some(Resolved::Num(1.0))
        );
        assert_eq!(
            f.resolve("model.layers.1.mlp.up.weight", 1.0),
            Some(Resolved::Num(0.2))
        );
        assert_eq!(f.resolve("model.norm.weight", 0.0), None);
        let fallback = parse("[{filter: mlp, value: 0.5}, {value: 0}]");
        assert_eq!(
            fallback.resolve("model.norm.weight", 0.0),
            Some(Resolved::Num(0.0))
        );
        // A model's filter list without a match falls through to the top level.
        let mut model = Params::default();
        model.insert("weight", f);
        let mut top = Params::default();
        top.insert("weight", parse("0.9"));
        assert_eq!(
            lookup(&[&model, &top], "weight", "model.norm.weight", 0.0),
            Some(Resolved::Num(0.9))
        );
        assert_eq!(
            lookup(&[&model, &top], "weight", "model.layers.0.mlp.w", 0.0),
            Some(Resolved::Num(0.2))
        );
        assert_eq!(lookup(&[&model, &top], "density", "x", 0.0), None);
        for bad in [
            "[]",
            "[1, {value: 2}]",
            "[{filter: a}]",
            "[{filter: a, value: 1, x: 2}]",
            "abc",
            ".nan",
            "[{filter: a, value: [{value: 1}]}]",
        ] {
            assert!(
                ParamValue::parse(&YamlLoader::load_from_str(bad).unwrap()[0], "p").is_err(),
                "{bad}"
            );
        }
    }
}
