//! FQDN rule patterns (DESIGN.md): `api.example.com` exact, `*.example.com`
//! exactly one more label, `**.example.com` one or more labels;
//! case-insensitive, trailing dot ignored.

use super::model::FqdnPattern;

pub fn parse_pattern(text: &str) -> Result<FqdnPattern, &'static str> {
    let lowered = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let (pattern, suffix): (fn(String) -> FqdnPattern, &str) =
        if let Some(rest) = lowered.strip_prefix("**.") {
            (FqdnPattern::AnyLabels, rest)
        } else if let Some(rest) = lowered.strip_prefix("*.") {
            (FqdnPattern::OneLabel, rest)
        } else {
            (FqdnPattern::Exact, lowered.as_str())
        };
    if suffix.is_empty() {
        return Err("has no name after the wildcard");
    }
    if suffix.len() > 253 {
        return Err("is longer than 253 characters");
    }
    for label in suffix.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has an empty label or one longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(
                "may hold only letters, digits, '-' and '_', with '*.' or '**.' only in front",
            );
        }
    }
    Ok(pattern(suffix.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            parse_pattern("API.Example.com."),
            Ok(FqdnPattern::Exact("api.example.com".into()))
        );
        assert_eq!(
            parse_pattern("*.azurecr.io"),
            Ok(FqdnPattern::OneLabel("azurecr.io".into()))
        );
        assert_eq!(
            parse_pattern("**.blob.core.windows.net"),
            Ok(FqdnPattern::AnyLabels("blob.core.windows.net".into()))
        );
        assert!(parse_pattern("*").is_err());
        assert!(parse_pattern("a.*.com").is_err());
        assert!(parse_pattern("a..com").is_err());
        assert!(parse_pattern("exa mple.com").is_err());
        assert!(parse_pattern(&"a".repeat(64)).is_err());
    }
}
