//! The parsed model of an `#[agent] impl` block.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::{
    Attribute, FnArg, GenericArgument, Generics, Ident, ImplItem, ImplItemFn, ItemImpl, LitStr,
    Pat, PathArguments, ReturnType, Type, Visibility,
};

use crate::attr::{self, string_args};

/// `#[agent(..)]` options.
pub const AGENT_OPTIONS: &[&str] = &["class", "crate", "state", "conn_state", "event"];
/// `#[agent(..)]` flags.
pub const AGENT_FLAGS: &[&str] = &["internal", "typescript"];
/// `#[callable(..)]` flags.
pub const CALLABLE_FLAGS: &[&str] = &["internal", "private"];
/// `#[callable(..)]` options.
pub const CALLABLE_OPTIONS: &[&str] = &["name"];
/// `#[schedule(..)]` options.
pub const SCHEDULE_OPTIONS: &[&str] = &["cron", "tz", "every"];

/// An `#[agent] impl Type { .. }` block.
pub struct AgentImpl {
    /// The block with the `#[callable]` markers removed, as it will be emitted.
    pub item: ItemImpl,
    /// `#[agent(class = "..")]`.
    pub class: Option<LitStr>,
    /// `#[agent(crate = "..")]`: the path of the `agents` crate.
    pub krate: Option<LitStr>,
    /// `#[agent(state = "..", conn_state = "..", event = "..")]`: the agent's types.
    pub types: Vec<(Ident, LitStr)>,
    /// `#[agent(internal)]`: reachable in-process only.
    pub internal: bool,
    /// `#[agent(typescript)]`: the client declares its TypeScript types.
    pub typescript: bool,
    /// The methods marked `#[callable]` or `#[schedule]`, in order.
    pub callables: Vec<Callable>,
    /// Every other associated item's name (they share the type's namespace).
    pub other_names: Vec<Ident>,
}

/// One `#[callable]` method.
pub struct Callable {
    pub ident: Ident,
    /// `#[callable(name = "..")]`.
    pub rename: Option<LitStr>,
    /// `#[callable(internal)]` / `#[callable(private)]`, as written (at most one is valid).
    pub reach: Vec<Ident>,
    /// For `#[schedule(..)]` methods: the attribute's options (and the attribute, for errors).
    pub schedule: Option<(Attribute, Vec<(Ident, LitStr)>)>,
    pub vis: Visibility,
    /// Doc comments, copied onto the client.
    pub docs: Vec<Attribute>,
    pub is_async: bool,
    pub receiver: Receiver,
    /// The parameters after the receiver, as written.
    pub params: Vec<Param>,
    pub generics: Generics,
    pub output: ReturnType,
    pub sig_span: Span,
}

/// How the method takes `self`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    None,
    Value,
    Ref,
    RefMut,
}

/// One parameter after the receiver.
pub struct Param {
    pub pat: Pat,
    pub ty: Type,
    /// Whether its type is `Ctx<..>` behind a reference (or not).
    pub is_ctx: bool,
}

/// What a callable returns, as the client sees it.
#[allow(clippy::large_enum_variant)] // built once per method, at compile time
pub enum Ret {
    /// No return type: `()`.
    Unit,
    /// A plain value: the call cannot fail with an application error.
    Plain(Type),
    /// `Result<T, E>`: `E` reaches the caller typed.
    Result { ok: Type, err: Type },
    /// `Result<T>` with the error hidden behind an alias: not allowed.
    AliasedResult(Type),
}

impl AgentImpl {
    pub fn parse(args: TokenStream, item: ItemImpl) -> syn::Result<Self> {
        let mut class = None;
        let mut krate = None;
        let mut types = Vec::new();
        let parsed = attr::args(args, AGENT_OPTIONS, AGENT_FLAGS, "#[agent]")?;
        let internal = parsed.flags.iter().any(|f| f == "internal");
        let typescript = parsed.flags.iter().any(|f| f == "typescript");
        for (key, value) in parsed.values {
            match key.to_string().as_str() {
                "class" => class = Some(value),
                "crate" => krate = Some(value),
                _ => types.push((key, value)),
            }
        }
        let mut item = item;
        let mut callables = Vec::new();
        let mut other_names = Vec::new();
        let mut errors: Option<syn::Error> = None;
        for impl_item in &mut item.items {
            let ImplItem::Fn(f) = impl_item else {
                match impl_item {
                    ImplItem::Const(c) => other_names.push(c.ident.clone()),
                    ImplItem::Type(t) => other_names.push(t.ident.clone()),
                    _ => {}
                }
                continue;
            };
            match take_marker(&mut f.attrs) {
                // In the impl of an interface trait every method is a callable.
                Ok(None) if item.trait_.is_some() => {
                    match Callable::parse(f, syn::parse_quote!(#[callable])) {
                        Ok(c) => callables.push(c),
                        Err(e) => combine(&mut errors, e),
                    }
                }
                Ok(None) => other_names.push(f.sig.ident.clone()),
                Ok(Some(attr)) => match Callable::parse(f, attr) {
                    Ok(c) => callables.push(c),
                    Err(e) => combine(&mut errors, e),
                },
                Err(e) => combine(&mut errors, e),
            }
        }
        match errors {
            Some(e) => Err(e),
            None => Ok(AgentImpl {
                item,
                class,
                krate,
                types,
                internal,
                typescript,
                callables,
                other_names,
            }),
        }
    }
}

pub fn combine(errors: &mut Option<syn::Error>, e: syn::Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

/// `#[callable]` or `#[schedule]` (with any path prefix).
fn is_marker(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|s| s.ident == "callable" || s.ident == "schedule")
}

/// Removes the `#[callable(..)]` or `#[schedule(..)]` marker from `attrs`, returning it (a
/// second marker is an error).
fn take_marker(attrs: &mut Vec<Attribute>) -> syn::Result<Option<Attribute>> {
    let mut found: Option<Attribute> = None;
    let mut result = Ok(());
    attrs.retain(|a| {
        if !is_marker(a) {
            return true;
        }
        if found.is_some() {
            result = Err(syn::Error::new_spanned(
                a,
                "a method takes one `#[callable]` or one `#[schedule(..)]`, not both and not twice",
            ));
        } else {
            found = Some(a.clone());
        }
        false
    });
    result.map(|()| found)
}

/// Re-emits an item with the `#[callable]`/`#[schedule]` markers removed (used when expansion
/// fails, so that they do not report themselves as misplaced), and the impl of an interface
/// trait with its `Ctx` (so that its absence is not reported too).
pub fn strip_callable_attrs(item: TokenStream) -> TokenStream {
    match syn::parse2::<ItemImpl>(item.clone()) {
        Ok(mut imp) => {
            for i in &mut imp.items {
                if let ImplItem::Fn(f) = i {
                    f.attrs.retain(|a| !is_marker(a));
                }
            }
            add_ctx(&mut imp, &syn::parse_quote!(::agents));
            imp.into_token_stream()
        }
        Err(_) => item,
    }
}

/// Whether `path` names one of the framework's traits (`Agent`, `AgentClass`), which `#[agent]`
/// does not go on.
pub fn is_agent_trait(path: &syn::Path) -> bool {
    path.segments
        .last()
        .is_some_and(|s| s.ident == "Agent" || s.ident == "AgentClass")
}

/// Gives the impl of an interface trait its `type Ctx = <krate>::Ctx<Self>;`, unless it has one
/// (or implements something else: `Agent`, or nothing).
pub fn add_ctx(imp: &mut ItemImpl, krate: &syn::Path) {
    let interface = imp
        .trait_
        .as_ref()
        .is_some_and(|(bang, path, _)| bang.is_none() && !is_agent_trait(path));
    let has_ctx = imp
        .items
        .iter()
        .any(|i| matches!(i, ImplItem::Type(t) if t.ident == "Ctx"));
    if interface && !has_ctx {
        imp.items
            .push(syn::parse_quote!(type Ctx = #krate::Ctx<Self>;));
    }
}

impl Callable {
    fn parse(f: &ImplItemFn, attr: Attribute) -> syn::Result<Self> {
        let is_schedule = attr
            .path()
            .segments
            .last()
            .is_some_and(|s| s.ident == "schedule");
        let schedule = if is_schedule {
            let options = match &attr.meta {
                syn::Meta::List(list) => string_args(list.tokens.clone(), SCHEDULE_OPTIONS, "#[schedule]")?,
                _ => {
                    return Err(syn::Error::new_spanned(
                        &attr,
                        "write `#[schedule(cron = \"*/5 * * * *\")]`, `#[schedule(cron = \"..\", tz = \"Europe/Paris\")]` or `#[schedule(every = \"30s\")]`",
                    ))
                }
            };
            Some((attr.clone(), options))
        } else {
            None
        };
        let options =
            match &attr.meta {
                _ if is_schedule => attr::Args::default(),
                syn::Meta::Path(_) => attr::Args::default(),
                syn::Meta::List(list) => attr::args(
                    list.tokens.clone(),
                    CALLABLE_OPTIONS,
                    CALLABLE_FLAGS,
                    "#[callable]",
                )?,
                syn::Meta::NameValue(nv) => return Err(syn::Error::new_spanned(
                    nv,
                    "write `#[callable]`, `#[callable(name = \"...\")]`, `#[callable(internal)]` or `#[callable(private)]`",
                )),
            };
        let rename = options.values.into_iter().next().map(|(_, v)| v);
        let reach = options.flags;
        let sig = &f.sig;
        let mut receiver = Receiver::None;
        let mut params = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(r) => {
                    receiver = match (&r.reference, r.mutability) {
                        (None, _) => Receiver::Value,
                        (Some(_), None) => Receiver::Ref,
                        (Some(_), Some(_)) => Receiver::RefMut,
                    }
                }
                FnArg::Typed(t) => params.push(Param {
                    pat: (*t.pat).clone(),
                    ty: (*t.ty).clone(),
                    is_ctx: is_ctx_type(&t.ty),
                }),
            }
        }
        Ok(Callable {
            ident: sig.ident.clone(),
            rename,
            reach,
            schedule,
            vis: f.vis.clone(),
            docs: docs(&f.attrs),
            is_async: sig.asyncness.is_some(),
            receiver,
            params,
            generics: sig.generics.clone(),
            output: sig.output.clone(),
            sig_span: sig.ident.span(),
        })
    }

    /// The name on the wire.
    pub fn wire_name(&self) -> String {
        self.rename
            .as_ref()
            .map(LitStr::value)
            .unwrap_or_else(|| self.ident.to_string())
    }

    /// The span to blame for the wire name.
    pub fn wire_span(&self) -> Span {
        self.rename
            .as_ref()
            .map(LitStr::span)
            .unwrap_or_else(|| self.ident.span())
    }

    /// The arguments a client passes: every parameter after `ctx`.
    pub fn args(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().skip(1)
    }

    pub fn ret(&self) -> Ret {
        ret_of(&self.output)
    }
}

/// What a method returns, as the client sees it.
pub fn ret_of(output: &ReturnType) -> Ret {
    {
        let ty = match output {
            ReturnType::Default => return Ret::Unit,
            ReturnType::Type(_, ty) => ty,
        };
        if let Type::Path(p) = &**ty {
            if let Some(last) = p.path.segments.last() {
                if last.ident == "Result" {
                    return match type_args(last).as_slice() {
                        [ok, err] => Ret::Result {
                            ok: (*ok).clone(),
                            err: (*err).clone(),
                        },
                        _ => Ret::AliasedResult((**ty).clone()),
                    };
                }
            }
        }
        if let Type::Tuple(t) = &**ty {
            if t.elems.is_empty() {
                return Ret::Unit;
            }
        }
        Ret::Plain((**ty).clone())
    }
}

/// The doc comments among `attrs` (copied onto the generated client).
pub fn docs(attrs: &[Attribute]) -> Vec<Attribute> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .cloned()
        .collect()
}

/// The type arguments of a path segment: `T, E` of `Result<T, E>`.
fn type_args(segment: &syn::PathSegment) -> Vec<&Type> {
    match &segment.arguments {
        PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The type arguments of `Streaming<..>` (any path prefix), if `ty` is one: the return type of
/// a streaming callable.
pub fn streaming_args(ty: &Type) -> Option<Vec<&Type>> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?;
            (last.ident == "Streaming").then(|| type_args(last))
        }
        _ => None,
    }
}

/// `Ctx<..>`, `&mut Ctx<..>`, `&Ctx<..>`, with any path prefix.
fn is_ctx_type(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => is_ctx_type(&r.elem),
        Type::Path(p) => {
            p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Ctx")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn parse(tokens: TokenStream) -> AgentImpl {
        AgentImpl::parse(TokenStream::new(), syn::parse2(tokens).unwrap()).unwrap()
    }

    #[test]
    fn finds_callables_and_strips_markers() {
        let a = parse(quote! {
            impl Counter {
                /// Adds.
                #[callable]
                pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, E> { todo!() }
                #[callable(name = "get-v1")]
                async fn get(&mut self, ctx: &mut agents::Ctx<Self>) -> i64 { 0 }
                fn helper(&self) {}
            }
        });
        assert_eq!(a.callables.len(), 2);
        assert_eq!(a.callables[0].wire_name(), "add");
        assert_eq!(a.callables[1].wire_name(), "get-v1");
        assert_eq!(a.callables[0].args().count(), 1);
        assert!(a.callables[1].params[0].is_ctx);
        assert_eq!(a.callables[0].docs.len(), 1);
        assert!(matches!(a.callables[0].ret(), Ret::Result { .. }));
        assert!(matches!(a.callables[1].ret(), Ret::Plain(_)));
        assert_eq!(a.other_names[0], "helper");
        let emitted = a.item.into_token_stream().to_string();
        assert!(!emitted.contains("callable"), "{emitted}");
    }

    #[test]
    fn classifies_return_types() {
        let a = parse(quote! {
            impl X {
                #[callable] async fn a(&mut self, c: &mut Ctx<Self>) {}
                #[callable] async fn b(&mut self, c: &mut Ctx<Self>) -> () {}
                #[callable] async fn c(&mut self, c: &mut Ctx<Self>) -> anyhow::Result<u8> { todo!() }
            }
        });
        assert!(matches!(a.callables[0].ret(), Ret::Unit));
        assert!(matches!(a.callables[1].ret(), Ret::Unit));
        assert!(matches!(a.callables[2].ret(), Ret::AliasedResult(_)));
    }

    #[test]
    fn finds_streams() {
        let ty: Type = syn::parse_quote!(agents::Streaming<u32, E>);
        assert_eq!(streaming_args(&ty).map(|a| a.len()), Some(2));
        let ty: Type = syn::parse_quote!(Streaming<u32>);
        assert_eq!(streaming_args(&ty).map(|a| a.len()), Some(1));
        let ty: Type = syn::parse_quote!(Vec<Streaming<u32>>);
        assert!(streaming_args(&ty).is_none());
    }

    #[test]
    fn rejects_unknown_options() {
        let e = AgentImpl::parse(quote!(klass = "x"), syn::parse2(quote!(impl X {})).unwrap())
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("valid options: `class = \"..\"`, `crate = \"..\"`"),
            "{e}"
        );
    }
}
