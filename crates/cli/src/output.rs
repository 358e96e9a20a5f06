//! Rendering of list and inspect results: `--format table|json|yaml|toml`. Every list and
//! inspect command goes through here so the formats behave the same everywhere. TOML has no
//! top-level array, so arrays are wrapped under `items` (as in Apple's tool).

use clap::ValueEnum;
use comfy_table::{Table, presets};
use serde::Serialize;

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
    Toml,
}

/// Something that can be shown as table rows.
pub trait Tabular {
    fn headers() -> Vec<&'static str>;
    fn row(&self) -> Vec<String>;
    /// The value `-q` prints.
    fn id(&self) -> String;
}

/// Renders a list in the given format (quiet: ids only, one per line).
pub fn render_list<T: Tabular + Serialize>(
    items: &[T],
    format: Format,
    quiet: bool,
) -> anyhow::Result<String> {
    if quiet {
        return Ok(items.iter().map(|i| i.id() + "\n").collect());
    }
    match format {
        Format::Table => {
            let mut table = Table::new();
            table.load_preset(presets::NOTHING);
            table.set_header(T::headers());
            for item in items {
                table.add_row(item.row());
            }
            // comfy-table pads the first column with a leading space; trim it per line.
            let text = table
                .to_string()
                .lines()
                .map(|l| l.trim_start_matches(' ').trim_end().to_string() + "\n")
                .collect();
            Ok(text)
        }
        other => render_value(&items, other),
    }
}

/// Renders one serialisable value (inspect results, properties) as JSON, YAML or TOML;
/// `table` means pretty JSON for values with no table form.
pub fn render_value<T: Serialize + ?Sized>(value: &T, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table | Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_norway::to_string(value)?,
        Format::Toml => {
            let json = serde_json::to_value(value)?;
            let json = match json {
                serde_json::Value::Array(_) => serde_json::json!({ "items": json }),
                other => other,
            };
            toml::to_string_pretty(&strip_nulls(json))?
        }
    })
}

/// TOML has no null: absent values are left out.
fn strip_nulls(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .filter(|v| !v.is_null())
                .map(strip_nulls)
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        name: String,
        ip: Option<String>,
    }

    impl Tabular for Row {
        fn headers() -> Vec<&'static str> {
            vec!["NAME", "IP"]
        }
        fn row(&self) -> Vec<String> {
            vec![self.name.clone(), self.ip.clone().unwrap_or_default()]
        }
        fn id(&self) -> String {
            self.name.clone()
        }
    }

    fn rows() -> Vec<Row> {
        vec![
            Row {
                name: "dev".into(),
                ip: Some("192.168.64.2".into()),
            },
            Row {
                name: "db".into(),
                ip: None,
            },
        ]
    }

    #[test]
    fn table_has_headers_and_rows() {
        let out = render_list(&rows(), Format::Table, false).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("IP"),
            "{out}"
        );
        assert!(lines[1].starts_with("dev") && lines[1].contains("192.168.64.2"));
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn quiet_prints_ids_only() {
        assert_eq!(
            render_list(&rows(), Format::Json, true).unwrap(),
            "dev\ndb\n"
        );
    }

    #[test]
    fn toml_wraps_arrays_under_items_and_drops_nulls() {
        let out = render_list(&rows(), Format::Toml, false).unwrap();
        let parsed: toml::Table = toml::from_str(&out).unwrap();
        let items = parsed["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert!(items[1].get("ip").is_none());
    }

    #[test]
    fn json_and_yaml_round_trip() {
        let json = render_list(&rows(), Format::Json, false).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["name"], "dev");
        let yaml = render_list(&rows(), Format::Yaml, false).unwrap();
        let y: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(y, v);
    }
}
