//! Procedural macros of `agents`. Use them through the `agents` crate: `#[agents::agent]`.
//!
//! The layout follows serde_derive: this file holds the entry points only; `ast` parses the
//! `impl` block into a model, `validate` checks it, `expand` generates code. Every error is
//! a spanned `syn::Error`; the user's item is re-emitted alongside it so that one mistake does
//! not cascade into many.

use proc_macro::TokenStream;

mod ast;
mod attr;
mod expand;
mod interface;
mod validate;

/// Turns an inherent `impl` block into an agent class. See `agents::agent`.
#[proc_macro_attribute]
pub fn agent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    expand::agent(args.into(), item.clone())
        .unwrap_or_else(|e| {
            let mut out = ast::strip_callable_attrs(item);
            out.extend(e.into_compile_error());
            out
        })
        .into()
}

/// Declares an agent's API as a trait, in a crate that needs only `agents-client`: generates
/// the typed client `<Trait>Client`, and the trait an agent implements with `#[agent] impl
/// Trait for MyAgent`. See `agents_client::interface`.
#[proc_macro_attribute]
pub fn interface(args: TokenStream, item: TokenStream) -> TokenStream {
    interface_with(args, item, quote::quote!(::agents_client))
}

/// `#[interface]` as the `agents` crate re-exports it (its generated code names
/// `::agents::client`).
#[doc(hidden)]
#[proc_macro_attribute]
pub fn interface_in_agents(args: TokenStream, item: TokenStream) -> TokenStream {
    interface_with(args, item, quote::quote!(::agents::client))
}

fn interface_with(
    args: TokenStream,
    item: TokenStream,
    krate: proc_macro2::TokenStream,
) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    interface::interface(args.into(), item.clone(), krate)
        .unwrap_or_else(|e| {
            let mut out = item;
            out.extend(e.into_compile_error());
            out
        })
        .into()
}

/// Marks a method of an `#[agent]` impl block as callable by clients. On its own (outside
/// `#[agent]`) it is an error.
#[proc_macro_attribute]
pub fn callable(_args: TokenStream, item: TokenStream) -> TokenStream {
    outside_agent("callable", item.into()).into()
}

/// Runs a method of an `#[agent]` impl block on a schedule. On its own it is an error.
#[proc_macro_attribute]
pub fn schedule(_args: TokenStream, item: TokenStream) -> TokenStream {
    outside_agent("schedule", item.into()).into()
}

/// The item, plus an error: `#[name]` was used outside an `#[agent]` impl block.
fn outside_agent(name: &str, item: proc_macro2::TokenStream) -> proc_macro2::TokenStream {
    let mut out = item.clone();
    let span = syn::parse2::<syn::ImplItemFn>(item)
        .map(|f| f.sig.ident.span())
        .unwrap_or_else(|_| proc_macro2::Span::call_site());
    out.extend(
        syn::Error::new(
            span,
            format!("`#[{name}]` only works on methods inside an `#[agent]` impl block"),
        )
        .into_compile_error(),
    );
    out
}
