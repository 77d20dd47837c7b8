//! The Helm chart (deploy/helm/tollgate) against the kustomization
//! (deploy/): with its default values the chart renders exactly the
//! objects `kubectl kustomize deploy/` does, and every render, defaults and
//! every value set (ci/*-values.yaml), passes the Kubernetes schemas. Real
//! helm and kubectl (kustomize) render them; scripts/setup.sh installs both.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = "deploy/helm/tollgate";

/// An object by (kind, namespace, name), and the object.
type Object = ((String, String, String), Value);
const NAMESPACE: &str = "tollgate-system";

pub fn check(root: &Path) -> anyhow::Result<()> {
    let kustomized = objects(&output(
        Command::new("kubectl")
            .current_dir(root)
            .args(["kustomize", "deploy"]),
    )?)?;
    let charted = render(root, None)?;
    let charted = objects(&charted)?;
    compare(&kustomized, &charted)?;

    let values_dir = root.join(CHART).join("ci");
    let mut values_files: Vec<_> = std::fs::read_dir(&values_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    values_files.sort();
    let renders = std::iter::once(None).chain(values_files.iter().map(|p| Some(p.as_path())));
    let scratch = root.join("target/chart");
    std::fs::create_dir_all(&scratch)?;
    for (index, values) in renders.enumerate() {
        let rendered = scratch.join(format!("render-{index}.yaml"));
        std::fs::write(&rendered, render(root, values)?)?;
        crate::run(
            Command::new("kubernetes-validate")
                .args(["--strict", "--quiet"])
                .arg(&rendered),
        )
        .with_context(|| format!("the chart rendered with {values:?}"))?;
    }
    println!(
        "chart: {} objects as the kustomization renders them; {} renders pass the schemas",
        charted.len(),
        values_files.len() + 1
    );
    Ok(())
}

/// `helm template` of the chart, with `values` over its defaults.
fn render(root: &Path, values: Option<&Path>) -> anyhow::Result<String> {
    let mut helm = Command::new("helm");
    helm.current_dir(root).args([
        "template",
        "tollgate",
        CHART,
        "--namespace",
        NAMESPACE,
        "--include-crds",
    ]);
    if let Some(values) = values {
        helm.arg("--values").arg(values);
    }
    output(&mut helm)
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?} (scripts/setup.sh installs it)"))?;
    if !output.status.success() {
        bail!("{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// The objects of a multi-document stream, by (kind, namespace, name); a
/// ConfigMap's `*.yaml` data is compared as what it holds, not as text
/// (the chart writes it back without the manifest's comments).
fn objects(stream: &str) -> anyhow::Result<Vec<Object>> {
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(stream) {
        let mut object = Value::deserialize(document)?;
        if object.is_null() {
            continue;
        }
        if object["kind"] == "ConfigMap"
            && let Some(data) = object.get_mut("data").and_then(Value::as_object_mut)
        {
            for (key, value) in data.iter_mut() {
                if key.ends_with(".yaml")
                    && let Some(text) = value.as_str()
                {
                    *value = serde_yaml_ng::from_str(text)?;
                }
            }
        }
        numbers_as_floats(&mut object);
        let field = |path: &[&str]| {
            path.iter()
                .fold(&object, |v, k| &v[*k])
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let key = (
            field(&["kind"]),
            field(&["metadata", "namespace"]),
            field(&["metadata", "name"]),
        );
        objects.push((key, object));
    }
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(objects)
}

/// Every number as a float: the renderers write `1` and `1.0` for the
/// same schema bound (kustomize re-serialises, helm copies CRDs as they
/// are).
fn numbers_as_floats(value: &mut Value) {
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64().and_then(serde_json::Number::from_f64) {
                *number = float;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(numbers_as_floats),
        Value::Object(fields) => fields.values_mut().for_each(numbers_as_floats),
        _ => {}
    }
}

fn compare(kustomized: &[Object], charted: &[Object]) -> anyhow::Result<()> {
    let keys = |objects: &[Object]| {
        objects
            .iter()
            .map(|(key, _)| key.clone())
            .collect::<Vec<_>>()
    };
    if keys(kustomized) != keys(charted) {
        bail!(
            "the chart renders other objects than the kustomization:\n  kustomize: {:?}\n  chart:     {:?}",
            keys(kustomized),
            keys(charted)
        );
    }
    for ((key, expected), (_, got)) in kustomized.iter().zip(charted) {
        if expected != got {
            bail!(
                "the chart renders {key:?} otherwise than the kustomization:\n  kustomize: {expected}\n  chart:     {got}"
            );
        }
    }
    Ok(())
}
