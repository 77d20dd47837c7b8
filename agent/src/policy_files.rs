//! Reading policy documents from the filesystem (and stdin): the I/O side
//! of `policy::document` and `policy::validate`, shared by the agent's
//! `--policy` and `tollgatectl apply -f`.

use std::{io::Read, path::PathBuf};

use tollgate_proto::v1 as api;

use tollgate_policy::{
    document::{FieldError, describe, parse_documents},
    validate::validate_all,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid policies:\n{}", describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("no policy documents in {}", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Empty(Vec<PathBuf>),
}

/// Reads the documents of files, directories (their `*.yaml`, `*.yml` and
/// `*.json`, in name order) and `-` (stdin). Nothing is returned unless
/// every document is valid; all problems are reported together.
pub fn load(paths: &[PathBuf]) -> Result<Vec<api::EgressPolicy>, LoadError> {
    let mut texts = Vec::new();
    for path in paths {
        let read_err = |source| LoadError::Read {
            path: path.clone(),
            source,
        };
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(read_err)?;
            texts.push(("stdin".to_owned(), text));
            continue;
        }
        let mut files = vec![path.clone()];
        if path.is_dir() {
            files = std::fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            files.sort();
        }
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
                path: file.clone(),
                source,
            })?;
            texts.push((file.display().to_string(), text));
        }
    }
    let mut documents = Vec::new();
    let mut errors = Vec::new();
    for (source, text) in &texts {
        match parse_documents(source, text) {
            Ok(parsed) => documents.extend(parsed),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid(errors));
    }
    if documents.is_empty() && !paths.is_empty() {
        return Err(LoadError::Empty(paths.to_vec()));
    }
    validate_all(&documents).map_err(LoadError::Invalid)?;
    Ok(documents.into_iter().map(|d| d.policy).collect())
}
