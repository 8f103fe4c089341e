//! `#[agents::interface]`: an agent's API as a trait, in a crate that needs only
//! `agents-client`. The trait is written as its client sees it (`async fn add(&self, by: i64) ->
//! Result<i64, E>`); the macro generates the typed client `<Trait>Client` and rewrites the trait
//! into the shape an agent implements with `#[agent] impl Trait for MyAgent`, so the method list
//! has one source of truth and the compiler checks both sides against it.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, ToTokens};
use syn::{FnArg, ItemTrait, Pat, Path, ReturnType, TraitItem, TraitItemFn, Type};

use crate::{
    ast::{combine, docs, ret_of, streaming_args, Ret},
    attr,
    expand::{client, method_info},
    validate::{Method, CLIENT_METHODS},
};

/// `#[interface(..)]` options.
const OPTIONS: &[&str] = &["crate", "state", "event"];
/// `#[interface(..)]` flags.
const FLAGS: &[&str] = &["typescript"];

/// Expands `#[interface(args)]` on `item`; `default_crate` is the path of `agents-client`
/// unless `crate = ".."` says otherwise.
pub fn interface(
    args: TokenStream,
    item: TokenStream,
    default_crate: TokenStream,
) -> syn::Result<TokenStream> {
    let item: ItemTrait = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "#[interface] goes on a trait: `#[agents::interface] pub trait CounterApi { async fn add(&self, by: i64) -> i64; }`",
        )
    })?;
    let options = attr::args(args, OPTIONS, FLAGS, "#[interface]")?;
    let typescript = !options.flags.is_empty();
    let mut errors: Option<syn::Error> = None;
    let (mut krate, mut state, mut event): (Path, Type, Type) = (
        syn::parse2(default_crate)?,
        syn::parse_quote!(()),
        syn::parse_quote!(()),
    );
    for (key, lit) in &options.values {
        let parsed = match key.to_string().as_str() {
            "crate" => lit.parse::<Path>().map(|p| krate = p),
            "state" => lit.parse::<Type>().map(|t| state = t),
            _ => lit.parse::<Type>().map(|t| event = t),
        };
        if let Err(e) = parsed {
            combine(
                &mut errors,
                syn::Error::new(lit.span(), format!("`{key}`: {e}")),
            );
        }
    }
    // Rule: an interface is a plain trait: no generics, no supertraits (the macro adds its own).
    if !item.generics.params.is_empty() || !item.supertraits.is_empty() {
        combine(
            &mut errors,
            syn::Error::new_spanned(
                &item.ident,
                "an interface trait takes no generics and no supertraits",
            ),
        );
    }
    let mut methods = Vec::new();
    for trait_item in &item.items {
        match trait_item {
            TraitItem::Fn(f) => match method(f, &item.vis) {
                Ok(m) => methods.push((m, f)),
                Err(e) => combine(&mut errors, e),
            },
            other => combine(
                &mut errors,
                syn::Error::new_spanned(
                    other,
                    "an interface trait holds only `async fn` methods (its types go in `#[interface(state = \"..\", event = \"..\")]`)",
                ),
            ),
        }
    }
    if let Some(e) = errors {
        return Err(e);
    }
    Ok(generate(
        &item, &krate, &state, &event, &methods, typescript,
    ))
}

/// One method, as its client sees it: `async fn name(&self, arg: Type, ..) -> Return;`.
fn method(f: &TraitItemFn, vis: &syn::Visibility) -> syn::Result<Method> {
    let mut errors: Option<syn::Error> = None;
    let mut err = |e: syn::Error| combine(&mut errors, e);
    let sig = &f.sig;
    let name = &sig.ident;
    // Rule: methods are `async` (a call is awaited).
    if sig.asyncness.is_none() {
        err(syn::Error::new_spanned(
            sig.fn_token,
            format!("interface method `{name}` must be an `async fn`"),
        ));
    }
    // Rule: the agent implements the method; the trait only declares it.
    if let Some(body) = &f.default {
        err(syn::Error::new_spanned(
            body,
            "an interface method has no body: the agent implements it",
        ));
    }
    // Rule: no generics: the wire needs concrete types.
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        err(syn::Error::new_spanned(
            &sig.generics,
            "interface methods cannot be generic: the wire needs concrete types",
        ));
    }
    // Rule: the names of the client's own methods are taken.
    if CLIENT_METHODS.contains(&name.to_string().as_str()) {
        err(syn::Error::new(
            name.span(),
            format!("`{name}` clashes with a method of the generated client; rename it"),
        ));
    }
    let mut inputs = sig.inputs.iter();
    // Rule: `&self` first, as the client calls it.
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        _ => err(syn::Error::new(
            name.span(),
            format!("interface method `{name}` takes `&self` first, as its client is called (the agent's side gets `&mut self` and `ctx`)"),
        )),
    }
    // Rule: arguments are plain names of owned types.
    let mut args = Vec::new();
    for input in inputs {
        let FnArg::Typed(t) = input else { continue };
        match (&*t.pat, &*t.ty) {
            (_, Type::Reference(_) | Type::ImplTrait(_)) => err(syn::Error::new_spanned(
                &t.ty,
                "interface arguments are decoded from the wire and must be owned concrete types: `String`, `Vec<T>`, ..",
            )),
            (Pat::Ident(p), ty) if p.by_ref.is_none() && p.subpat.is_none() => {
                args.push((p.ident.clone(), ty.clone()))
            }
            (other, _) => err(syn::Error::new_spanned(
                other,
                "interface arguments need plain names (`point: Point`)",
            )),
        }
    }
    let (ok, err_ty) = match ret_of(&sig.output) {
        Ret::Unit => (syn::parse_quote!(()), None),
        Ret::Plain(t) => (t, None),
        Ret::Result { ok, err } => (ok, Some(err)),
        Ret::AliasedResult(t) => {
            err(syn::Error::new_spanned(
                &t,
                "name the error type: `Result<T, E>` (E: Serialize + Display reaches the caller typed)",
            ));
            (syn::parse_quote!(()), None)
        }
    };
    // Rule (for now): streaming methods are declared on an inherent `#[agent]` impl.
    if streaming_args(&ok).is_some() {
        err(syn::Error::new_spanned(
            &ok,
            "streaming methods are not supported in interfaces yet: declare them with #[callable] on the agent's inherent #[agent] impl",
        ));
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(Method {
            ident: name.clone(),
            wire: name.to_string(),
            vis: vis.clone(),
            docs: docs(&f.attrs),
            args,
            ok,
            err: err_ty,
            stream: None,
            schedule: None,
            internal: false,
            private: false,
        }),
    }
}

fn generate(
    item: &ItemTrait,
    krate: &Path,
    state: &Type,
    event: &Type,
    methods: &[(Method, &TraitItemFn)],
    typescript: bool,
) -> TokenStream {
    let p = quote!(#krate::__private);
    let vis = &item.vis;
    let name = &item.ident;
    let attrs = &item.attrs;
    let client_name = format_ident!("{}Client", name);
    let doc = format!(
        "Typed client of the [`{name}`] interface: one method per method of the trait, over any \
         transport (`connect` for the network; in-process, the runtime's `agent::<A>(name)` for an \
         agent `A` that implements it)."
    );
    let refs: Vec<&Method> = methods.iter().map(|(m, _)| m).collect();
    let ts_name = name.to_string();
    let ts = typescript.then_some(ts_name.as_str());
    let client_items = client(&client_name, &doc, vis, &p, &refs, state, event, ts);
    let infos = refs.iter().map(|m| method_info(m, &p));
    // The agent's side: `&mut self`, the agent's context, the arguments; a `Send` future.
    let agent_methods = methods.iter().map(|(m, f)| {
        let ident = &m.ident;
        let docs = &m.docs;
        let params = m.args.iter().map(|(n, t)| quote!(#n: #t));
        let output = match &f.sig.output {
            ReturnType::Default => quote!(()),
            ReturnType::Type(_, ty) => ty.to_token_stream(),
        };
        quote! {
            #(#docs)*
            fn #ident(&mut self, ctx: &mut Self::Ctx, #(#params),*)
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send;
        }
    });
    quote! {
        #(#attrs)*
        #vis trait #name: ::core::marker::Send + 'static {
            /// The context each method gets: `agents::Ctx<Self>` (`#[agent]` sets it).
            type Ctx: ::core::marker::Send;
            #(#agent_methods)*
        }

        #client_items

        const _: () = {
            impl #p::Interface for #client_name {
                type State = #state;
                type Event = #event;
                const METHODS: &'static [#p::MethodInfo] = &[#(#infos),*];
            }
        };
    }
}
