//! Reading policy documents: multi-document YAML, or JSON (which YAML reads
//! too), into the `tollgate.v1.EgressPolicy` messages of the API.

use tollgate_proto::v1::EgressPolicy;

/// A problem with one field of one document: `path` is where, as a user
/// would write it (`spec.egress[2].to[0].cidr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Which document: the source name and the document's position (from 1).
    pub document: DocumentRef,
    pub path: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentRef {
    pub source: String,
    pub index: usize,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (document {}): ",
            self.document.source, self.document.index
        )?;
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The errors one per line, indented, for a message that lists them.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A policy as read, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcedPolicy {
    pub document: DocumentRef,
    pub policy: EgressPolicy,
}

/// Parses every document in `text`. Empty documents are skipped. Returns all
/// problems, not just the first.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<SourcedPolicy>, Vec<FieldError>> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for (position, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document_ref = DocumentRef {
            source: source.to_owned(),
            index: position + 1,
        };
        let value: serde_yaml_ng::Value = match serde::Deserialize::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                // A syntax error ends the stream: nothing after it can be read.
                errors.push(FieldError {
                    document: document_ref,
                    path: String::new(),
                    message: e.to_string(),
                });
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        match serde_path_to_error::deserialize::<_, EgressPolicy>(value) {
            Ok(policy) => policies.push(SourcedPolicy {
                document: document_ref,
                policy,
            }),
            Err(e) => errors.push(FieldError {
                document: document_ref,
                path: field_path(e.path()),
                message: e.into_inner().to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

/// Reads one policy given as a JSON value (a Kubernetes resource as the API
/// server serves it), with the same field errors as a policy file.
pub fn from_json(
    document: DocumentRef,
    value: serde_json::Value,
) -> Result<SourcedPolicy, FieldError> {
    match serde_path_to_error::deserialize::<_, EgressPolicy>(value) {
        Ok(policy) => Ok(SourcedPolicy { document, policy }),
        Err(e) => Err(FieldError {
            document,
            path: field_path(e.path()),
            message: e.into_inner().to_string(),
        }),
    }
}

/// `spec.egress[2].to` rather than serde_path_to_error's `spec.egress.2.to`.
pub fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    if out == "?" { String::new() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_several_documents_and_skips_empty_ones() {
        let text = "---\napiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: a}\n---\n---\n{\"kind\": \"EgressPolicy\", \"metadata\": {\"name\": \"b\"}}\n";
        let policies = parse_documents("p.yaml", text).unwrap();
        let names: Vec<_> = policies
            .iter()
            .map(|p| p.policy.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(policies[1].document.index, 3);
    }

    #[test]
    fn unknown_and_mistyped_fields_name_their_path() {
        let text = "metadata: {name: a}\nspec:\n  egress:\n  - acton: allow\n---\nspec:\n  egress:\n  - ports:\n    - port: eighty\n";
        let errors = parse_documents("p.yaml", text).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].path, "spec.egress[0].acton");
        assert!(
            errors[0].message.contains("unknown field `acton`"),
            "{}",
            errors[0].message
        );
        assert_eq!(errors[1].path, "spec.egress[0].ports[0].port");
        assert_eq!(errors[1].document.index, 2);
        assert_eq!(
            errors[1].to_string(),
            format!(
                "p.yaml (document 2): spec.egress[0].ports[0].port: {}",
                errors[1].message
            )
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        let errors = parse_documents("bad.yaml", "metadata: {name: [}\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with("bad.yaml (document 1): "),
            "{}",
            errors[0]
        );
    }
}
