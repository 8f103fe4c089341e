//! Checks the parsed model against the rules of an agent, producing the model expansion uses.

use std::collections::HashMap;

use heck::ToKebabCase;
use quote::ToTokens;
use syn::{Ident, LitStr, Pat, Path, Type, Visibility};

use crate::ast::{combine, is_agent_trait, streaming_args, AgentImpl, Callable, Receiver, Ret};

/// Methods of the generated client (inherent, or from the traits it implements): a callable of
/// the same name would clash with them.
pub const CLIENT_METHODS: &[&str] = &[
    "connect",
    "connect_with",
    "events",
    "state",
    "state_changes",
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
    /// The shared state, connection state and event types (`()` unless given).
    pub state: Type,
    pub conn_state: Type,
    pub event: Type,
    /// `#[agent(internal)]`: not served to the network.
    pub internal: bool,
    /// `#[agent(typescript)]`.
    pub typescript: bool,
    /// `impl SomeInterface for Type`: the `#[agents::interface]` trait it implements, whose
    /// client and types the agent takes.
    pub interface: Option<Path>,
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
    /// For a streaming callable (`ok` is `Streaming<T>` or `Streaming<T, E>`): the item type `T`.
    pub stream: Option<Type>,
    /// For `#[schedule]` methods: what the runtime registers. They get no client method.
    pub schedule: Option<ScheduleSpec>,
    /// `#[callable(internal)]`: refused to callers over the network.
    pub internal: bool,
    /// `#[callable(private)]`: answers only the agent itself (its schedules, its queue, its
    /// spawned work); not on the client.
    pub private: bool,
}

/// A validated `#[schedule(..)]`.
pub struct ScheduleSpec {
    pub cron: Option<String>,
    pub tz: Option<String>,
    pub every_ms: Option<u64>,
}

pub fn validate(a: &AgentImpl) -> syn::Result<Agent> {
    let mut errors: Option<syn::Error> = None;
    let item = &a.item;
    let interface = match &item.trait_ {
        None => None,
        Some((Some(bang), _, _)) => {
            return Err(syn::Error::new_spanned(bang, "#[agent] cannot go on a negative impl"))
        }
        Some((None, path, _)) if is_agent_trait(path) => {
            return Err(syn::Error::new_spanned(
                path,
                "#[agent] goes on the type's inherent impl block (`impl Counter { .. }`), or on the impl of an `#[agents::interface]` trait; implement `Agent` in a block of its own",
            ))
        }
        Some((None, path, _)) => Some(path.clone()),
    };
    if interface.is_some() {
        if let Some((key, _)) = a.types.iter().find(|(k, _)| k != "conn_state") {
            combine(
                &mut errors,
                syn::Error::new(
                    key.span(),
                    format!("the interface trait names the `{key}` type: give it there, in `#[agents::interface({key} = \"..\")]`"),
                ),
            );
        }
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

    let (mut state, mut conn_state, mut event): (Type, Type, Type) = (
        syn::parse_quote!(()),
        syn::parse_quote!(()),
        syn::parse_quote!(()),
    );
    for (key, lit) in &a.types {
        match lit.parse::<Type>() {
            Ok(ty) => match key.to_string().as_str() {
                "state" => state = ty,
                "conn_state" => conn_state = ty,
                _ => event = ty,
            },
            Err(e) => combine(
                &mut errors,
                syn::Error::new(lit.span(), format!("`{key}` must name a type: {e}")),
            ),
        }
    }

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
            state,
            conn_state,
            event,
            internal: a.internal,
            typescript: a.typescript,
            interface,
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

/// Checks one `#[callable]` (or `#[schedule]`) method against every rule below, reporting all
/// the rules it breaks at once.
fn method(c: &Callable, agent: &Ident) -> syn::Result<Method> {
    let mut errors: Option<syn::Error> = None;
    let mut err = |e: syn::Error| combine(&mut errors, e);
    let rules = [
        is_async(c),
        takes_mut_self(c),
        not_generic(c),
        no_clash_with_calls(c),
        no_clash_with_client(c, agent),
        wire_name_is_valid(c),
        ctx_comes_first(c),
        one_reach(c),
    ];
    rules.into_iter().filter_map(Result::err).for_each(&mut err);
    let schedule = c
        .schedule
        .as_ref()
        .and_then(|(attr, options)| schedule_spec(attr, options).map_err(&mut err).ok());
    let args = arguments(c, &mut err);
    if let Err(e) = schedule_takes_no_arguments(c, &args) {
        err(e);
    }
    let (ok, err_ty) = returns(c).unwrap_or_else(|e| {
        err(e);
        (syn::parse_quote!(()), None)
    });
    let stream = stream_item(c, &ok, err_ty.as_ref()).unwrap_or_else(|e| {
        err(e);
        None
    });
    match errors {
        Some(e) => Err(e),
        None => Ok(Method {
            ident: c.ident.clone(),
            wire: c.wire_name(),
            vis: c.vis.clone(),
            docs: c.docs.clone(),
            args,
            ok,
            err: err_ty,
            stream,
            schedule,
            internal: c.reach.iter().any(|f| f == "internal"),
            private: c.reach.iter().any(|f| f == "private"),
        }),
    }
}

// Rule: a callable is `internal` (this process may call it) or `private` (only the agent itself
// may), not both.
fn one_reach(c: &Callable) -> syn::Result<()> {
    match c.reach.as_slice() {
        [_, second, ..] => Err(syn::Error::new(
            second.span(),
            "a callable is either `internal` (anything in this process may call it) or `private` \
             (only the agent itself: its schedules, its queue, its spawned work), not both",
        )),
        _ => Ok(()),
    }
}

// Rule: a callable is an `async fn` (a call is awaited).
fn is_async(c: &Callable) -> syn::Result<()> {
    match c.is_async {
        true => Ok(()),
        false => Err(syn::Error::new(
            c.sig_span,
            format!("callable `{}` must be an `async fn`", c.ident),
        )),
    }
}

// Rule: a callable takes `&mut self`: it runs on the agent, which it has to itself.
fn takes_mut_self(c: &Callable) -> syn::Result<()> {
    let name = &c.ident;
    let message = match c.receiver {
        Receiver::RefMut => return Ok(()),
        Receiver::None => {
            format!("callable `{name}` must take `&mut self` first (it runs on the agent)")
        }
        Receiver::Value => {
            format!("callable `{name}` takes `self` by value; callables take `&mut self`")
        }
        Receiver::Ref => format!(
            "callable `{name}` takes `&self`; callables take `&mut self` (a handler has the agent to itself)"
        ),
    };
    Err(syn::Error::new(c.sig_span, message))
}

// Rule: no generics: the wire needs concrete types.
fn not_generic(c: &Callable) -> syn::Result<()> {
    if c.generics.params.is_empty() && c.generics.where_clause.is_none() {
        return Ok(());
    }
    Err(syn::Error::new_spanned(
        &c.generics,
        "callables cannot be generic: the wire needs concrete types",
    ))
}

// Rule: `calls()` is the agent's generated function.
fn no_clash_with_calls(c: &Callable) -> syn::Result<()> {
    match AGENT_FUNCTIONS.contains(&c.ident.to_string().as_str()) {
        true => Err(clash_with_calls(&c.ident)),
        false => Ok(()),
    }
}

// Rule: a callable is a method of the generated client: the client's own names are taken.
fn no_clash_with_client(c: &Callable, agent: &Ident) -> syn::Result<()> {
    let name = &c.ident;
    let private = c.reach.iter().any(|f| f == "private");
    if c.schedule.is_some() || private || !CLIENT_METHODS.contains(&name.to_string().as_str()) {
        return Ok(());
    }
    Err(syn::Error::new(
        name.span(),
        format!(
            "`{name}` clashes with a method of the generated `{agent}Client`; rename the method \
             (keep `{name}` on the wire with #[callable(name = \"{name}\")])"
        ),
    ))
}

// Rule: a wire name is 1 or more of A-Z, a-z, 0-9, `_`, `-` and `.`.
fn wire_name_is_valid(c: &Callable) -> syn::Result<()> {
    let wire = c.wire_name();
    let valid = !wire.is_empty()
        && wire
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    match valid {
        true => Ok(()),
        false => Err(syn::Error::new(
            c.wire_span(),
            "a wire name is 1 or more of A-Z, a-z, 0-9, `_`, `-` and `.`",
        )),
    }
}

// Rule: `ctx: &mut Ctx<Self>` comes right after `&mut self`, once.
fn ctx_comes_first(c: &Callable) -> syn::Result<()> {
    match c.params.first() {
        Some(p) if p.is_ctx => match &p.ty {
            Type::Reference(r) if r.mutability.is_some() => Ok(()),
            _ => Err(syn::Error::new_spanned(
                &p.ty,
                "the context is taken as `ctx: &mut Ctx<Self>`",
            )),
        },
        _ => match c.params.iter().find(|p| p.is_ctx) {
            Some(p) => Err(syn::Error::new_spanned(
                &p.pat,
                "`ctx: &mut Ctx<Self>` must come right after `&mut self`",
            )),
            None => Err(syn::Error::new(
                c.sig_span,
                format!(
                    "callable `{}` is missing `ctx: &mut Ctx<Self>` right after `&mut self`",
                    c.ident
                ),
            )),
        },
    }
}

// Rule: the client's arguments (all after `ctx`) have plain names and owned, concrete types,
// and the context is taken once.
fn arguments(c: &Callable, err: &mut impl FnMut(syn::Error)) -> Vec<(Ident, Type)> {
    let mut args = Vec::new();
    for p in c.args() {
        if p.is_ctx {
            // Reported by `ctx_comes_first` when misplaced; a second context is an error of its own.
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
    args
}

// Rule: the runtime calls a `#[schedule]` method with no arguments.
fn schedule_takes_no_arguments(c: &Callable, args: &[(Ident, Type)]) -> syn::Result<()> {
    if c.schedule.is_none() || args.is_empty() {
        return Ok(());
    }
    Err(syn::Error::new(
        c.sig_span,
        format!("#[schedule] method `{}` takes only `&mut self` and `ctx`: the runtime calls it with no arguments", c.ident),
    ))
}

// Rule: a fallible callable names its error type: `Result<T, E>`, not an alias.
fn returns(c: &Callable) -> syn::Result<(Type, Option<Type>)> {
    match c.ret() {
        Ret::Unit => Ok((syn::parse_quote!(()), None)),
        Ret::Plain(t) => Ok((t, None)),
        Ret::Result { ok, err } => Ok((ok, Some(err))),
        Ret::AliasedResult(t) => Err(syn::Error::new_spanned(
            &t,
            "name the error type of a callable: `Result<T, E>` (E: Serialize + Display reaches the caller typed)",
        )),
    }
}

// Rule: a stream is `Streaming<T>` or `Result<Streaming<T, E>, E>` (one error type), and a
// `#[schedule]` method does not stream (nobody would receive its chunks).
fn stream_item(c: &Callable, ok: &Type, err_ty: Option<&Type>) -> syn::Result<Option<Type>> {
    let Some(types) = streaming_args(ok) else {
        return Ok(None);
    };
    let item = match types.as_slice() {
        [item] => (*item).clone(),
        [item, stream_err] => {
            let same = err_ty.is_some_and(|e| {
                e.to_token_stream().to_string() == stream_err.to_token_stream().to_string()
            });
            if !same {
                return Err(syn::Error::new_spanned(
                    stream_err,
                    "a stream fails with its callable's error type: `Result<Streaming<T, E>, E>` (or `Streaming<T>` for a stream that cannot fail)",
                ));
            }
            (*item).clone()
        }
        _ => {
            return Err(syn::Error::new_spanned(
                ok,
                "a streaming callable returns `Streaming<T>` or `Result<Streaming<T, E>, E>`",
            ))
        }
    };
    if c.schedule.is_some() {
        return Err(syn::Error::new_spanned(
            ok,
            format!(
                "#[schedule] method `{}` cannot stream: nobody receives its chunks",
                c.ident
            ),
        ));
    }
    Ok(Some(item))
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
    // With no callables the client names no type of the user's: `pub` is always possible, and
    // needed when the agent type is `pub` (its `AgentClass::Client` may not be less visible).
    methods
        .iter()
        .map(|m| &m.vis)
        .max_by_key(|v| rank(v))
        .cloned()
        .unwrap_or_else(|| syn::parse_quote!(pub))
}

fn schedule_spec(attr: &syn::Attribute, options: &[(Ident, LitStr)]) -> syn::Result<ScheduleSpec> {
    let get = |k: &str| options.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let (cron, tz, every) = (get("cron"), get("tz"), get("every"));
    match (cron, every) {
        (Some(_), Some(e)) | (None, Some(e)) if tz.is_some() => Err(syn::Error::new(
            e.span(),
            "`tz` goes with `cron`; `every` counts real time",
        )),
        (Some(_), Some(e)) => Err(syn::Error::new(
            e.span(),
            "give either `cron` or `every`, not both",
        )),
        (None, None) => Err(syn::Error::new_spanned(
            attr,
            "#[schedule] needs `cron = \"...\"` or `every = \"...\"`",
        )),
        (Some(c), None) => Ok(ScheduleSpec {
            cron: Some(c.value()),
            tz: tz.map(LitStr::value),
            every_ms: None,
        }),
        (None, Some(e)) => Ok(ScheduleSpec {
            cron: None,
            tz: None,
            every_ms: Some(parse_duration(e)?),
        }),
    }
}

/// `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"2d"` in milliseconds.
fn parse_duration(lit: &LitStr) -> syn::Result<u64> {
    let text = lit.value();
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && factor > 0 => Ok(n * factor),
        _ => Err(syn::Error::new(
            lit.span(),
            "`every` is a positive whole number and a unit: `250ms`, `30s`, `5m`, `1h` or `2d`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        let d = |s: &str| parse_duration(&LitStr::new(s, proc_macro2::Span::call_site()));
        assert_eq!(d("250ms").unwrap(), 250);
        assert_eq!(d("30s").unwrap(), 30_000);
        assert_eq!(d("5 m").unwrap(), 300_000);
        assert_eq!(d("2d").unwrap(), 172_800_000);
        for bad in ["", "0s", "5", "5w", "-1s", "1.5s"] {
            assert!(d(bad).is_err(), "{bad}");
        }
    }
}
