//! Code generation for `#[agent]`: dispatch by name, the typed client, call descriptors.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, ToTokens};

use crate::{
    ast::AgentImpl,
    validate::{validate, widest, Agent, Method},
};

pub fn agent(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let item: syn::ItemImpl = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "#[agent] goes on an inherent impl block: `#[agent] impl Counter { .. }`",
        )
    })?;
    let mut parsed = AgentImpl::parse(args, item)?;
    let agent = validate(&parsed)?;
    let generated = generate(&agent);
    // The interface's methods take `ctx: &mut Self::Ctx`: here it is the agent's `Ctx`.
    crate::ast::add_ctx(&mut parsed.item, &agent.krate);
    let item = parsed.item.into_token_stream();
    Ok(quote! { #item #generated })
}

fn generate(a: &Agent) -> TokenStream {
    let Agent {
        self_ty,
        ident,
        class,
        krate,
        methods,
        state,
        conn_state,
        event,
        internal,
        typescript,
        interface,
    } = a;
    let interface = interface.as_ref();
    let p = quote!(#krate::__private);
    let vis = widest(methods);
    let calls = format_ident!("{}Calls", ident);
    let calls_doc =
        format!("Describes calls of [`{ident}`] without making them (for schedules and queues).");

    let callables: Vec<&Method> = methods.iter().filter(|m| m.schedule.is_none()).collect();
    // `private` callables are described (to be scheduled) but on no client.
    let public: Vec<&Method> = callables.iter().copied().filter(|m| !m.private).collect();
    let (client, client_items, types) = match interface {
        // The interface's own client, and its types.
        Some(path) => {
            let client = interface_client(path);
            let types = quote! {
                type State = <#client as #p::Interface>::State;
                type Event = <#client as #p::Interface>::Event;
            };
            (client, quote!(), types)
        }
        None => {
            let name = format_ident!("{}Client", ident);
            let doc = format!(
                "Typed client of the [`{ident}`] agent: one method per callable. Get one in-process with \
                 `runtime.agent::<{ident}>(name)` or `ctx.agent::<{ident}>(name)`."
            );
            let ts = typescript.then_some(class.as_str());
            let items = client(&name, &doc, &vis, &p, &public, state, event, ts);
            let types = quote! {
                type State = #state;
                type Event = #event;
            };
            (quote!(#name), items, types)
        }
    };
    // A stored call has nobody to receive chunks: streams get no descriptor.
    let call_methods = callables
        .iter()
        .filter(|m| m.stream.is_none())
        .map(|m| call_method(m, &p, self_ty));
    let target = match interface {
        Some(path) => quote!(<#self_ty as #path>),
        None => quote!(#self_ty),
    };
    let arms = methods.iter().map(|m| dispatch_arm(m, &target, &p));
    let infos = public.iter().map(|m| method_info(m, &p));
    let schedules = methods.iter().filter_map(|m| static_schedule(m, &p));

    quote! {
        #client_items

        #[doc = #calls_doc]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #calls;

        const _: () = {
            impl #self_ty {
                /// Describes calls of this agent without making them.
                #[allow(dead_code)]
                #vis fn calls() -> #calls {
                    #calls
                }
            }

            impl #calls {
                #(#call_methods)*
            }

            impl #p::AgentClass for #self_ty {
                const CLASS: &'static str = #class;
                const INTERNAL: bool = #internal;
                const METHODS: &'static [#p::MethodInfo] = &[#(#infos),*];
                const SCHEDULES: &'static [#p::StaticSchedule] = &[#(#schedules),*];
                #types
                type ConnState = #conn_state;
                type Client = #client;

                fn dispatch<'a>(
                    &'a mut self,
                    ctx: &'a mut #p::Ctx<Self>,
                    call: &'a #p::Invocation,
                ) -> #p::BoxFuture<'a, ::core::result::Result<#p::Payload, #p::RawError>> {
                    #p::Box::pin(async move {
                        match call.method() {
                            #(#arms)*
                            other => ::core::result::Result::Err(#p::RawError::unknown_method(other)),
                        }
                    })
                }
            }
        };
    }
}

/// The client of the interface trait `path`: `CounterApi` → `CounterApiClient`, beside it.
pub fn interface_client(path: &syn::Path) -> TokenStream {
    let mut path = path.clone();
    if let Some(last) = path.segments.last_mut() {
        last.ident = format_ident!("{}Client", last.ident);
        last.arguments = syn::PathArguments::None;
    }
    quote!(#path)
}

/// A typed client `name` with one method per callable of `methods`, over the `__private` items
/// at `p`: what `#[agent]` generates for an agent, and `#[interface]` for a trait. With
/// `typescript` (the agent's or interface's name), also its TypeScript declarations.
#[allow(clippy::too_many_arguments)] // the parts of a client
pub fn client(
    name: &syn::Ident,
    doc: &str,
    vis: &syn::Visibility,
    p: &TokenStream,
    methods: &[&Method],
    state: &syn::Type,
    event: &syn::Type,
    typescript: Option<&str>,
) -> TokenStream {
    let client = name;
    let client_methods = methods.iter().map(|m| client_method(m, p));
    let typescript =
        typescript.map(|ts_name| typescript_fn(ts_name, vis, p, methods, state, event));
    quote! {
        #[doc = #doc]
        #[derive(Clone, Debug)]
        #vis struct #client {
            core: #p::ClientCore,
        }

        const _: () = {
            impl ::core::convert::From<#p::ClientCore> for #client {
                fn from(core: #p::ClientCore) -> Self {
                    #client { core }
                }
            }

            #[allow(private_interfaces)]
            impl #client {
                /// A client over any transport.
                #[allow(dead_code)]
                #vis fn from_transport(transport: #p::Arc<dyn #p::Transport>) -> Self {
                    #client { core: #p::ClientCore::new(transport) }
                }

                /// Connects to the agent at `url` (`ws://host/agents/{class}/{name}`) over a
                /// WebSocket with the postcard protocol.
                #[allow(dead_code)]
                #vis async fn connect(url: &str) -> ::core::result::Result<Self, #p::ConnectError> {
                    Self::connect_with(url, #p::ConnectOptions::new()).await
                }

                /// Connects with `options`: headers (a token in `Authorization` rather than
                /// in the URL), the codec (JSON for types postcard cannot carry), a timeout.
                #[allow(dead_code)]
                #vis async fn connect_with(
                    url: &str,
                    options: #p::ConnectOptions,
                ) -> ::core::result::Result<Self, #p::ConnectError> {
                    let transport = #p::WsTransport::connect_with(url, options).await?;
                    ::core::result::Result::Ok(#client {
                        core: #p::ClientCore::new(#p::Arc::new(transport)),
                    })
                }

                /// The events the agent sends to this connection (broadcasts and sends), typed.
                /// Only a network client receives events: over an in-process transport the
                /// stream ends at once. The first stream gets every event since the client
                /// connected (what `on_connect` sent included); later ones, events from then
                /// on.
                #[allow(dead_code)]
                #vis fn events(&self) -> #p::EventStream<#event> {
                    self.core.events()
                }

                /// The agent's shared state as last received (a network client gets it on
                /// connecting and on every change); `None` before any, or in-process.
                #[allow(dead_code)]
                #vis fn state(&self) -> ::core::option::Option<#state> {
                    self.core.state()
                }

                /// The changes of the shared state from now on (see [`state`](Self::state)).
                #[allow(dead_code)]
                #vis fn state_changes(&self) -> #p::StateStream<#state> {
                    self.core.state_changes()
                }

                /// The same client with another timeout for each call.
                #[allow(dead_code)]
                #vis fn with_timeout(self, timeout: ::core::time::Duration) -> Self {
                    #client { core: self.core.with_timeout(timeout) }
                }

                #(#client_methods)*
                #typescript
            }
        };
    }
}

/// `typescript()`: the client's TypeScript declarations (see `agents_client::typescript`).
fn typescript_fn(
    name: &str,
    vis: &syn::Visibility,
    p: &TokenStream,
    methods: &[&Method],
    state: &syn::Type,
    event: &syn::Type,
) -> TokenStream {
    let ts = |ty: &dyn ToTokens| quote!(d.ty::<#ty>());
    let methods = methods.iter().map(|m| {
        let wire = &m.wire;
        let params = m.args.iter().map(|(n, t)| {
            let n = n.to_string();
            let t = ts(t);
            quote!((#n, #t))
        });
        // A stream's result is the type of its chunks.
        let result = match &m.stream {
            Some(item) => ts(item),
            None => ts(&m.ok),
        };
        let error = match &m.err {
            Some(e) => ts(e),
            None => quote!(::std::string::String::from("never")),
        };
        quote! {
            #p::typescript::Method {
                name: #wire,
                params: ::std::vec![#(#params),*],
                result: #result,
                error: #error,
            }
        }
    });
    let (state, event) = (ts(state), ts(event));
    quote! {
        /// The TypeScript declarations of this client, for `agents.js`: its `Methods`,
        /// `Event`, `State` and `Client` (see `agents_client::typescript`).
        #[allow(dead_code)]
        #vis fn typescript() -> ::std::string::String {
            let mut d = #p::typescript::Declarations::new();
            let methods = [#(#methods),*];
            let (event, state) = (#event, #state);
            d.module(#name, &methods, &event, &state)
        }
    }
}

fn err_ty(m: &Method, p: &TokenStream) -> TokenStream {
    match &m.err {
        Some(e) => e.to_token_stream(),
        None => quote!(#p::NoError),
    }
}

/// The parameter list `a: A, b: B` and the argument tuple `(a, b,)` of a callable's client side.
fn params_and_tuple(args: &[(syn::Ident, syn::Type)]) -> (Vec<TokenStream>, TokenStream) {
    let params = args.iter().map(|(n, t)| quote!(#n: #t)).collect();
    let names = args.iter().map(|(n, _)| n);
    (params, quote!((#(#names,)*)))
}

pub fn client_method(m: &Method, p: &TokenStream) -> TokenStream {
    let Method {
        ident,
        wire,
        vis,
        docs,
        args,
        ok,
        ..
    } = m;
    let err = err_ty(m, p);
    let (params, tuple) = params_and_tuple(args);
    if let Some(item) = &m.stream {
        return quote! {
            #(#docs)*
            #[allow(dead_code)]
            #vis async fn #ident(&self, #(#params),*) -> #p::CallStream<#item, #err> {
                self.core.call_stream::<_, #item, #err>(#wire, #tuple).await
            }
        };
    }
    quote! {
        #(#docs)*
        #[allow(dead_code)]
        #vis async fn #ident(&self, #(#params),*) -> ::core::result::Result<#ok, #p::RpcError<#err>> {
            self.core.call::<_, #ok, #err>(#wire, #tuple).await
        }
    }
}

fn call_method(m: &Method, p: &TokenStream, self_ty: &syn::Type) -> TokenStream {
    let Method {
        ident,
        wire,
        vis,
        docs,
        args,
        ..
    } = m;
    let (params, tuple) = params_and_tuple(args);
    quote! {
        #(#docs)*
        #[allow(dead_code)]
        #vis fn #ident(&self, #(#params),*) -> #p::MethodCall<#self_ty> {
            #p::MethodCall::new(#wire, &#tuple)
        }
    }
}

fn static_schedule(m: &Method, p: &TokenStream) -> Option<TokenStream> {
    let s = m.schedule.as_ref()?;
    let wire = &m.wire;
    let opt = |v: &Option<String>| match v {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let (cron, tz) = (opt(&s.cron), opt(&s.tz));
    let every = match s.every_ms {
        Some(ms) => quote!(::core::option::Option::Some(#ms)),
        None => quote!(::core::option::Option::None),
    };
    Some(quote!(#p::StaticSchedule { method: #wire, cron: #cron, tz: #tz, every_ms: #every }))
}

fn dispatch_arm(m: &Method, target: &TokenStream, p: &TokenStream) -> TokenStream {
    let Method {
        ident, wire, args, ..
    } = m;
    let names: Vec<_> = args.iter().map(|(n, _)| n).collect();
    let types = args.iter().map(|(_, t)| t);
    let decode = if args.is_empty() {
        quote!(call.no_args()?;)
    } else {
        quote!(let (#(#names,)*): (#(#types,)*) = call.args()?;)
    };
    let invoke = quote!(#target::#ident(self, ctx, #(#names),*).await);
    let reply = match (&m.stream, &m.err) {
        (Some(_), Some(_)) => quote!(call.stream(#invoke)),
        (Some(_), None) => {
            quote!(call.stream(::core::result::Result::<_, #p::NoError>::Ok(#invoke)))
        }
        (None, Some(_)) => quote!(call.result(#invoke)),
        (None, None) => quote!(call.ok(#invoke)),
    };
    // `#[schedule]` and `#[callable(private)]` methods answer only the runtime (the agent's own
    // schedules, queue and spawned work), `#[callable(internal)]` ones only this process: to
    // anyone else they do not exist.
    let guard = if m.schedule.is_some() || m.private {
        Some(quote! {
            if !call.is_internal() {
                return ::core::result::Result::Err(#p::RawError::unknown_method(#wire));
            }
        })
    } else if m.internal {
        Some(quote! {
            if call.is_remote() {
                return ::core::result::Result::Err(#p::RawError::unknown_method(#wire));
            }
        })
    } else {
        None
    };
    quote! {
        #wire => {
            #guard
            #decode
            #reply
        }
    }
}

pub fn method_info(m: &Method, p: &TokenStream) -> TokenStream {
    let wire = &m.wire;
    let internal = m.internal;
    let params = m.args.iter().map(|(n, t)| format!("{n}: {}", tokens(t)));
    let returns = tokens(&m.ok);
    let error = match &m.err {
        Some(e) => {
            let e = tokens(e);
            quote!(::core::option::Option::Some(#e))
        }
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #p::MethodInfo {
            name: #wire, params: &[#(#params),*], returns: #returns, error: #error, internal: #internal,
        }
    }
}

/// A type as compact text: `Vec<String>`, not `Vec < String >`.
fn tokens(t: &impl ToTokens) -> String {
    let s = t.to_token_stream().to_string();
    s.replace(" < ", "<")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace(" :: ", "::")
}
