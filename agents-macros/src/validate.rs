//! Checks the parsed model against the rules of an agent, producing the model expansion uses.

use std::collections::HashMap;

use heck::ToKebabCase;
use syn::{Ident, Pat, Path, Type, Visibility};

use crate::ast::{combine, AgentImpl, Callable, Receiver, Ret};

/// Methods of the generated client (inherent, or from the traits it implements): a callable of
/// the same name would clash with them.
pub const CLIENT_METHODS: &[&str] = &[
    "from_transport",
    "with_timeout",
    "clone",
    "fmt",
    "from",
    "into",
];
/// The associated function `#[agent]` adds to the agent type.
pub const AGENT_FUNCTIONS: &[&str] = &["calls"];

/// An agent ready to expand.
pub struct Agent {
    pub self_ty: Type,
    pub ident: Ident,
    pub class: String,
    pub krate: Path,
    pub methods: Vec<Method>,
}

/// A callable ready to expand.
pub struct Method {
    pub ident: Ident,
    pub wire: String,
    pub vis: Visibility,
    pub docs: Vec<syn::Attribute>,
    /// The client's arguments (everything after `ctx`).
    pub args: Vec<(Ident, Type)>,
    /// The success type and the application error type (`None`: cannot fail).
    pub ok: Type,
    pub err: Option<Type>,
}

pub fn validate(a: &AgentImpl) -> syn::Result<Agent> {
    let mut errors: Option<syn::Error> = None;
    let item = &a.item;
    if let Some((_, path, _)) = &item.trait_ {
        return Err(syn::Error::new_spanned(
            path,
            "#[agent] goes on the type's inherent impl block (`impl Counter { .. }`); implement `Agent` in a block of its own",
        ));
    }
    if !item.generics.params.is_empty() {
        combine(
            &mut errors,
            syn::Error::new_spanned(&item.generics, "agent types cannot be generic"),
        );
    }
    let ident = match &*item.self_ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    };
    let Some(ident) = ident else {
        return Err(syn::Error::new_spanned(
            &item.self_ty,
            "#[agent] expects `impl TypeName { .. }`",
        ));
    };

    let class = match &a.class {
        Some(lit) => {
            let class = lit.value();
            if !valid_class(&class) {
                combine(
                    &mut errors,
                    syn::Error::new(
                        lit.span(),
                        "a class is 1 to 64 characters of a-z, 0-9 and single inner dashes, e.g. \"chat-room\"",
                    ),
                );
            }
            class
        }
        None => {
            let class = ident.to_string().to_kebab_case();
            if !valid_class(&class) {
                combine(
                    &mut errors,
                    syn::Error::new(
                        ident.span(),
                        format!("the default class `{class}` is not valid; set one with #[agent(class = \"...\")]"),
                    ),
                );
            }
            class
        }
    };
    let krate = match &a.krate {
        Some(lit) => lit.parse::<Path>().unwrap_or_else(|e| {
            combine(
                &mut errors,
                syn::Error::new(lit.span(), format!("`crate` must be a path: {e}")),
            );
            syn::parse_quote!(::agents)
        }),
        None => syn::parse_quote!(::agents),
    };

    for name in &a.other_names {
        if AGENT_FUNCTIONS.contains(&name.to_string().as_str()) {
            combine(&mut errors, clash_with_calls(name));
        }
    }
    let mut methods = Vec::new();
    let mut wire_names: HashMap<String, Ident> = HashMap::new();
    for c in &a.callables {
        match method(c, &ident) {
            Ok(m) => {
                if let Some(first) = wire_names.get(&m.wire) {
                    combine(
                        &mut errors,
                        syn::Error::new(
                            c.wire_span(),
                            format!(
                                "duplicate wire name `{}`: `{first}` already uses it; give one of them #[callable(name = \"...\")]",
                                m.wire
                            ),
                        ),
                    );
                } else {
                    wire_names.insert(m.wire.clone(), m.ident.clone());
                }
                methods.push(m);
            }
            Err(e) => combine(&mut errors, e),
        }
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(Agent {
            self_ty: (*item.self_ty).clone(),
            ident,
            class,
            krate,
            methods,
        }),
    }
}

fn clash_with_calls(name: &Ident) -> syn::Error {
    syn::Error::new(
        name.span(),
        format!("`{name}` clashes with the `{name}()` function #[agent] generates; rename it"),
    )
}

fn valid_class(class: &str) -> bool {
    !class.is_empty()
        && class.len() <= 64
        && class
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !class.starts_with('-')
        && !class.ends_with('-')
        && !class.contains("--")
}

fn method(c: &Callable, agent: &Ident) -> syn::Result<Method> {
    let mut errors: Option<syn::Error> = None;
    let mut err = |e: syn::Error| combine(&mut errors, e);
    let name = &c.ident;
    if !c.is_async {
        err(syn::Error::new(
            c.sig_span,
            format!("callable `{name}` must be an `async fn`"),
        ));
    }
    match c.receiver {
        Receiver::RefMut => {}
        Receiver::None => err(syn::Error::new(
            c.sig_span,
            format!("callable `{name}` must take `&mut self` first (it runs on the agent)"),
        )),
        Receiver::Value => err(syn::Error::new(
            c.sig_span,
            format!("callable `{name}` takes `self` by value; callables take `&mut self`"),
        )),
        Receiver::Ref => err(syn::Error::new(
            c.sig_span,
            format!("callable `{name}` takes `&self`; callables take `&mut self` (a handler has the agent to itself)"),
        )),
    }
    if !c.generics.params.is_empty() || c.generics.where_clause.is_some() {
        err(syn::Error::new_spanned(
            &c.generics,
            "callables cannot be generic: the wire needs concrete types",
        ));
    }
    if AGENT_FUNCTIONS.contains(&name.to_string().as_str()) {
        err(clash_with_calls(name));
    }
    if CLIENT_METHODS.contains(&name.to_string().as_str()) {
        err(syn::Error::new(
            name.span(),
            format!(
                "`{name}` clashes with a method of the generated `{agent}Client`; rename the method \
                 (keep `{name}` on the wire with #[callable(name = \"{name}\")])"
            ),
        ));
    }
    let wire = c.wire_name();
    if wire.is_empty()
        || !wire
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        err(syn::Error::new(
            c.wire_span(),
            "a wire name is 1 or more of A-Z, a-z, 0-9, `_`, `-` and `.`",
        ));
    }

    match c.params.first() {
        Some(p) if p.is_ctx => {
            if !matches!(&p.ty, Type::Reference(r) if r.mutability.is_some()) {
                err(syn::Error::new_spanned(
                    &p.ty,
                    "the context is taken as `ctx: &mut Ctx<Self>`",
                ));
            }
        }
        _ => match c.params.iter().find(|p| p.is_ctx) {
            Some(p) => err(syn::Error::new_spanned(
                &p.pat,
                "`ctx: &mut Ctx<Self>` must come right after `&mut self`",
            )),
            None => err(syn::Error::new(
                c.sig_span,
                format!(
                    "callable `{name}` is missing `ctx: &mut Ctx<Self>` right after `&mut self`"
                ),
            )),
        },
    }
    let mut args = Vec::new();
    for p in c.args() {
        if p.is_ctx {
            // Reported above when misplaced; a second context is an error of its own.
            if c.params.first().is_some_and(|f| f.is_ctx) {
                err(syn::Error::new_spanned(&p.pat, "the context is taken once"));
            }
            continue;
        }
        let ident = match &p.pat {
            Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => pi.ident.clone(),
            other => {
                err(syn::Error::new_spanned(
                    other,
                    "callable arguments need plain names (`point: Point`); destructure inside the body",
                ));
                continue;
            }
        };
        match &p.ty {
            Type::Reference(_) => err(syn::Error::new_spanned(
                &p.ty,
                "callable arguments are decoded from the wire and must be owned: use `String`, `Vec<T>`, .. instead of references",
            )),
            Type::ImplTrait(_) => err(syn::Error::new_spanned(&p.ty, "callable arguments need concrete types")),
            _ => {}
        }
        args.push((ident, p.ty.clone()));
    }
    let (ok, err_ty) = match c.ret() {
        Ret::Unit => (syn::parse_quote!(()), None),
        Ret::Plain(t) => (t, None),
        Ret::Result { ok, err } => (ok, Some(err)),
        Ret::AliasedResult(t) => {
            err(syn::Error::new_spanned(
                &t,
                "name the error type of a callable: `Result<T, E>` (E: Serialize + Display reaches the caller typed)",
            ));
            (syn::parse_quote!(()), None)
        }
    };
    match errors {
        Some(e) => Err(e),
        None => Ok(Method {
            ident: name.clone(),
            wire,
            vis: c.vis.clone(),
            docs: c.docs.clone(),
            args,
            ok,
            err: err_ty,
        }),
    }
}

/// The visibility of the generated types: that of the most visible callable.
pub fn widest(methods: &[Method]) -> Visibility {
    fn rank(v: &Visibility) -> u8 {
        match v {
            Visibility::Public(_) => 3,
            Visibility::Restricted(r) if r.path.is_ident("crate") => 2,
            Visibility::Restricted(_) => 1,
            Visibility::Inherited => 0,
        }
    }
    methods
        .iter()
        .map(|m| &m.vis)
        .max_by_key(|v| rank(v))
        .cloned()
        .unwrap_or(Visibility::Inherited)
}
