//! Parsing `key = "value"` attribute arguments, with errors that list the valid keys.

use syn::{
    parse::Parser, punctuated::Punctuated, Expr, ExprLit, Lit, LitStr, MetaNameValue, Token,
};

/// Parses `key = "string", ...` where every key is one of `valid`.
pub fn string_args(
    tokens: proc_macro2::TokenStream,
    valid: &[&str],
    what: &str,
) -> syn::Result<Vec<(syn::Ident, LitStr)>> {
    let pairs = Punctuated::<MetaNameValue, Token![,]>::parse_terminated
        .parse2(tokens)
        .map_err(|e| {
            syn::Error::new(
                e.span(),
                format!(
                    "expected `key = \"value\"` arguments for {what}; valid keys: {}",
                    list(valid)
                ),
            )
        })?;
    let mut out: Vec<(syn::Ident, LitStr)> = Vec::new();
    for pair in pairs {
        let Some(key) = pair.path.get_ident().cloned() else {
            return Err(syn::Error::new_spanned(
                &pair.path,
                format!("unknown {what} option; valid keys: {}", list(valid)),
            ));
        };
        if !valid.contains(&key.to_string().as_str()) {
            return Err(syn::Error::new(
                key.span(),
                format!("unknown {what} option `{key}`; valid keys: {}", list(valid)),
            ));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(syn::Error::new(
                key.span(),
                format!("`{key}` is given twice"),
            ));
        }
        match pair.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) => out.push((key, s)),
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    format!("`{key}` takes a string literal: {key} = \"...\""),
                ))
            }
        }
    }
    Ok(out)
}

fn list(valid: &[&str]) -> String {
    valid
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
