//! The compiled schema: entities and feature views from the config, checked once at start and
//! indexed for the hot paths (event validation, apply, reads).

use std::collections::HashMap;

/// The schema's name → index maps. Their keys come from the config, never from a client
/// (a client's name is only looked up), so a fast non-keyed hash is safe here; SipHash was
/// 9 % of the instructions of an ingest (callgrind, `scripts/callgrind-ops.sh`).
type NameMap<V> = HashMap<String, V, rustc_hash::FxBuildHasher>;

use crate::config::{Config, ConfigError};
use crate::time::EpochMs;
use crate::value::{FeatureType, Value};
use crate::window::{AggFn, Window};

/// Most features one view may declare: the record codec counts them in a `u16`, and a row
/// holds one slot per feature.
pub const VIEW_FEATURES_MAX: usize = 4096;

pub type ViewId = u16;
pub type FeatureIdx = u16;

#[derive(Debug, Clone)]
pub struct Entity {
    pub name: String,
    /// Name of the key column in reads (Feast's entity key, e.g. `user_id`).
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct Feature {
    pub name: String,
    pub ty: FeatureType,
    pub default: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct Aggregation {
    pub name: String,
    pub of: FeatureIdx,
    pub window: Window,
}

/// Where a view fed by somebody else's Kafka topic finds its event in a record's JSON value.
#[derive(Debug, Clone)]
pub struct Source {
    pub topic: String,
    /// `None`: the record's Kafka key.
    pub key_field: Option<String>,
    /// `None`: the record's Kafka timestamp.
    pub ts_field: Option<String>,
    pub event_id_field: Option<String>,
    /// Every feature and the JSON field it is read from.
    pub fields: Vec<(FeatureIdx, String)>,
}

#[derive(Debug, Clone)]
pub struct View {
    pub id: ViewId,
    pub name: String,
    pub entity: usize,
    /// `None`: values never expire.
    pub ttl_ms: Option<EpochMs>,
    pub allowed_lateness_ms: EpochMs,
    pub features: Vec<Feature>,
    pub aggregations: Vec<Aggregation>,
    /// Fed by somebody else's Kafka topic instead of Quiver's ingest.
    pub source: Option<Source>,
    by_name: NameMap<FeatureIdx>,
}

impl View {
    /// A feature events may write (not an aggregation).
    pub fn feature_index(&self, name: &str) -> Option<FeatureIdx> {
        self.by_name.get(name).copied()
    }

    /// [`feature_index`](Self::feature_index), trying position `hint` first: producers tend
    /// to list a view's features in its order, so a name is usually the one after the last
    /// (one string compare instead of a hash lookup: 9 % of an ingest's instructions went to
    /// these lookups, at the edge and again in the materializer).
    #[inline]
    pub fn feature_index_near(&self, name: &str, hint: usize) -> Option<FeatureIdx> {
        match self.features.get(hint) {
            Some(f) if f.name == name => FeatureIdx::try_from(hint).ok(),
            _ => self.feature_index(name),
        }
    }

    /// A readable column: features first (`0..features.len()`), then aggregations.
    pub fn column_index(&self, name: &str) -> Option<FeatureIdx> {
        self.feature_index(name).or_else(|| {
            let a = self.aggregations.iter().position(|a| a.name == name)?;
            FeatureIdx::try_from(self.features.len() + a).ok()
        })
    }

    pub fn columns(&self) -> usize {
        self.features.len() + self.aggregations.len()
    }

    pub fn column_name(&self, idx: FeatureIdx) -> &str {
        let i = usize::from(idx);
        match self.features.get(i) {
            Some(f) => &f.name,
            None => &self.aggregations[i - self.features.len()].name,
        }
    }

    /// The aggregation a column index names, if it names one.
    pub fn aggregation_of_column(&self, idx: FeatureIdx) -> Option<usize> {
        usize::from(idx).checked_sub(self.features.len())
    }

    pub fn feature(&self, idx: FeatureIdx) -> &Feature {
        &self.features[usize::from(idx)]
    }
}

#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub entities: Vec<Entity>,
    pub views: Vec<View>,
    by_name: NameMap<ViewId>,
}

impl Schema {
    pub fn compile(config: &Config) -> Result<Schema, ConfigError> {
        let mut schema = Schema::default();
        let mut entity_index = HashMap::new();
        for (i, e) in config.entities.iter().enumerate() {
            let path = format!("entity[{i}]");
            if e.name.is_empty() || e.key.is_empty() {
                return Err(ConfigError::field(path, "name and key must be non-empty"));
            }
            if entity_index.insert(e.name.clone(), i).is_some() {
                return Err(ConfigError::field(
                    format!("{path}.name"),
                    "duplicate entity name",
                ));
            }
            schema.entities.push(Entity {
                name: e.name.clone(),
                key: e.key.clone(),
            });
        }
        if config.views.len() > usize::from(ViewId::MAX) {
            return Err(ConfigError::field("view", "too many views"));
        }
        for (vi, v) in config.views.iter().enumerate() {
            let path = format!("view[{vi}]");
            if v.name.is_empty() || v.name.contains(':') {
                return Err(ConfigError::field(
                    format!("{path}.name"),
                    "must be non-empty and contain no ':'",
                ));
            }
            let Some(&entity) = entity_index.get(&v.entity) else {
                return Err(ConfigError::field(
                    format!("{path}.entity"),
                    format!("unknown entity {:?}", v.entity),
                ));
            };
            if v.features.is_empty() || v.features.len() > VIEW_FEATURES_MAX {
                return Err(ConfigError::field(
                    format!("{path}.features"),
                    format!("a view has 1..={VIEW_FEATURES_MAX} features"),
                ));
            }
            let mut features = Vec::with_capacity(v.features.len());
            let mut by_name = NameMap::default();
            for (fi, f) in v.features.iter().enumerate() {
                let fpath = format!("{path}.features[{fi}]");
                if f.name.is_empty() || f.name.contains(':') {
                    return Err(ConfigError::field(
                        format!("{fpath}.name"),
                        "must be non-empty and contain no ':'",
                    ));
                }
                let ty = FeatureType::parse(&f.ty, f.dims)
                    .map_err(|m| ConfigError::field(format!("{fpath}.type"), m))?;
                let default = match &f.default {
                    None => None,
                    Some(d) => Some(toml_default(d, ty).ok_or_else(|| {
                        ConfigError::field(
                            format!("{fpath}.default"),
                            format!("does not fit type {ty}"),
                        )
                    })?),
                };
                if by_name.insert(f.name.clone(), fi as FeatureIdx).is_some() {
                    return Err(ConfigError::field(
                        format!("{fpath}.name"),
                        format!("duplicate feature {:?}", f.name),
                    ));
                }
                features.push(Feature {
                    name: f.name.clone(),
                    ty,
                    default,
                });
            }
            let mut aggregations = Vec::new();
            for (ai, a) in v.aggregations.iter().enumerate() {
                let apath = format!("{path}.aggregations[{ai}]");
                if by_name.contains_key(&a.name)
                    || aggregations.iter().any(|x: &Aggregation| x.name == a.name)
                {
                    return Err(ConfigError::field(
                        format!("{apath}.name"),
                        format!("duplicate name {:?}", a.name),
                    ));
                }
                let Some(&of) = by_name.get(&a.of) else {
                    return Err(ConfigError::field(
                        format!("{apath}.of"),
                        format!("unknown feature {:?}", a.of),
                    ));
                };
                let Some(func) = AggFn::parse(&a.func) else {
                    return Err(ConfigError::field(
                        format!("{apath}.fn"),
                        format!("expected one of {:?}", AggFn::NAMES),
                    ));
                };
                if func != AggFn::Count && !features[usize::from(of)].ty.is_numeric() {
                    return Err(ConfigError::field(
                        format!("{apath}.of"),
                        "must name a numeric feature",
                    ));
                }
                let window = Window::new(func, a.window.as_ms(), a.tile.map(|t| t.as_ms()))
                    .map_err(|m| {
                        let field = if m.starts_with("tile") {
                            "tile"
                        } else {
                            "window"
                        };
                        ConfigError::field(format!("{apath}.{field}"), m)
                    })?;
                aggregations.push(Aggregation {
                    name: a.name.clone(),
                    of,
                    window,
                });
            }
            let id = vi as ViewId;
            if schema.by_name.insert(v.name.clone(), id).is_some() {
                return Err(ConfigError::field(
                    format!("{path}.name"),
                    "duplicate view name",
                ));
            }
            let source = match &v.source {
                None => None,
                Some(src) => Some(compile_source(src, &features, &by_name, &path)?),
            };
            schema.views.push(View {
                id,
                source,
                name: v.name.clone(),
                entity,
                ttl_ms: v.ttl.map(|d| d.as_ms()),
                allowed_lateness_ms: v.allowed_lateness.map(|d| d.as_ms()).unwrap_or(0),
                features,
                aggregations,
                by_name,
            });
        }
        Ok(schema)
    }

    pub fn view_id(&self, name: &str) -> Option<ViewId> {
        self.by_name.get(name).copied()
    }

    pub fn view(&self, id: ViewId) -> &View {
        &self.views[usize::from(id)]
    }

    pub fn view_by_name(&self, name: &str) -> Option<&View> {
        self.view_id(name).map(|id| self.view(id))
    }

    pub fn entity_of(&self, view: &View) -> &Entity {
        &self.entities[view.entity]
    }
}

fn toml_default(v: &toml::Value, ty: FeatureType) -> Option<Value> {
    let value = match (v, ty) {
        (toml::Value::Float(f), FeatureType::F64) => Value::F64(*f),
        (toml::Value::Integer(i), FeatureType::F64) => Value::F64(*i as f64),
        (toml::Value::Integer(i), FeatureType::I64) => Value::I64(*i),
        (toml::Value::Boolean(b), FeatureType::Bool) => Value::Bool(*b),
        (toml::Value::String(s), FeatureType::String) => Value::Str(s.as_str().into()),
        (toml::Value::Array(a), FeatureType::F32s(d)) if a.len() == d as usize => {
            let mut out = Vec::with_capacity(a.len());
            for x in a {
                out.push(match x {
                    toml::Value::Float(f) => *f as f32,
                    toml::Value::Integer(i) => *i as f32,
                    _ => return None,
                });
            }
            Value::F32s(out.into())
        }
        _ => return None,
    };
    value.fits(ty).then_some(value)
}

/// A view's `source`: every feature read from the field of its name unless `fields` says
/// otherwise, and `fields` naming only features.
fn compile_source(
    src: &crate::config::ViewSourceConfig,
    features: &[Feature],
    by_name: &NameMap<FeatureIdx>,
    path: &str,
) -> Result<Source, ConfigError> {
    for name in src.fields.keys() {
        if !by_name.contains_key(name) {
            return Err(ConfigError::field(
                format!("{path}.source.fields"),
                format!("{name:?} is not a feature of this view"),
            ));
        }
    }
    let fields = features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let field = src.fields.get(&f.name).unwrap_or(&f.name);
            (i as FeatureIdx, field.clone())
        })
        .collect();
    Ok(Source {
        topic: src.kafka_topic.clone(),
        key_field: src.key_field.clone(),
        ts_field: src.ts_field.clone(),
        event_id_field: src.event_id_field.clone(),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn compile(views: &str) -> Result<super::Schema, String> {
        let text = format!("[[entity]]\nname = \"user\"\nkey = \"user_id\"\n{views}");
        Config::from_toml_with_env(&text, Vec::new())
            .map(|c| super::Schema::compile(&c).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rejects_bad_views_naming_the_field() {
        let e = compile(
            "[[view]]\nname=\"v\"\nentity=\"nobody\"\nfeatures=[{name=\"a\",type=\"f64\"}]",
        )
        .unwrap_err();
        assert!(e.contains("view[0].entity"), "{e}");
        let e =
            compile("[[view]]\nname=\"v\"\nentity=\"user\"\nfeatures=[{name=\"a\",type=\"f65\"}]")
                .unwrap_err();
        assert!(e.contains("view[0].features[0].type"), "{e}");
        let e = compile(
            "[[view]]\nname=\"v\"\nentity=\"user\"\nfeatures=[{name=\"a\",type=\"i64\",default=\"x\"}]",
        )
        .unwrap_err();
        assert!(e.contains("view[0].features[0].default"), "{e}");
        let e = compile("[[view]]\nname=\"v\"\nentity=\"user\"\nfeatures=[{name=\"a\",type=\"f64\"},{name=\"a\",type=\"f64\"}]")
            .unwrap_err();
        assert!(e.contains("duplicate feature"), "{e}");
    }

    #[test]
    fn compiles_embeddings_and_defaults() {
        let s = compile("[[view]]\nname=\"v\"\nentity=\"user\"\nttl=\"1h\"\nfeatures=[{name=\"e\",type=\"f32[3]\"},{name=\"x\",type=\"f32[]\",dims=2,default=[1.0,2]}]")
            .unwrap();
        let v = s.view_by_name("v").unwrap();
        assert_eq!(v.ttl_ms, Some(3_600_000));
        assert_eq!(v.feature(1).ty, crate::value::FeatureType::F32s(2));
        assert!(v.feature(1).default.is_some());
    }
}
