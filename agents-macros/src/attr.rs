//! Parsing attribute arguments (`key = "value"` and bare flags), with errors that list the
//! valid options.

use syn::{parse::Parser, punctuated::Punctuated, Expr, ExprLit, Ident, Lit, LitStr, Meta, Token};

/// The arguments of an attribute: `key = "string"` pairs and bare flags.
#[derive(Default)]
pub struct Args {
    pub values: Vec<(Ident, LitStr)>,
    pub flags: Vec<Ident>,
}

/// Parses `key = "string", flag, ...` where every key is one of `strings` and every flag one of
/// `flags`.
pub fn args(
    tokens: proc_macro2::TokenStream,
    strings: &[&str],
    flags: &[&str],
    what: &str,
) -> syn::Result<Args> {
    let valid = options(strings, flags);
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated
        .parse2(tokens)
        .map_err(|e| {
            syn::Error::new(
                e.span(),
                format!("expected `key = \"value\"` arguments for {what}; valid options: {valid}"),
            )
        })?;
    let mut out = Args::default();
    let mut seen: Vec<Ident> = Vec::new();
    for meta in metas {
        let Some(key) = meta.path().get_ident().cloned() else {
            return Err(syn::Error::new_spanned(
                meta.path(),
                format!("unknown {what} option; valid options: {valid}"),
            ));
        };
        let name = key.to_string();
        if !strings.contains(&name.as_str()) && !flags.contains(&name.as_str()) {
            return Err(syn::Error::new(
                key.span(),
                format!("unknown {what} option `{key}`; valid options: {valid}"),
            ));
        }
        if seen.contains(&key) {
            return Err(syn::Error::new(
                key.span(),
                format!("`{key}` is given twice"),
            ));
        }
        seen.push(key.clone());
        match meta {
            Meta::Path(_) if flags.contains(&name.as_str()) => out.flags.push(key),
            Meta::NameValue(nv) if strings.contains(&name.as_str()) => match nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => out.values.push((key, s)),
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        format!("`{key}` takes a string literal: {key} = \"...\""),
                    ))
                }
            },
            other if flags.contains(&name.as_str()) => {
                return Err(syn::Error::new_spanned(
                    other,
                    format!("`{key}` takes no value: write just `{key}`"),
                ))
            }
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

/// Parses `key = "string", ...` where every key is one of `valid`.
pub fn string_args(
    tokens: proc_macro2::TokenStream,
    valid: &[&str],
    what: &str,
) -> syn::Result<Vec<(Ident, LitStr)>> {
    Ok(args(tokens, valid, &[], what)?.values)
}

fn options(strings: &[&str], flags: &[&str]) -> String {
    strings
        .iter()
        .map(|k| format!("`{k} = \"..\"`"))
        .chain(flags.iter().map(|f| format!("`{f}`")))
        .collect::<Vec<_>>()
        .join(", ")
}
