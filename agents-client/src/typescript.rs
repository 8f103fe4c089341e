//! TypeScript declarations of a generated client, for `agents.js` (feature `typescript`).
//!
//! `#[agent(typescript)]` and `#[interface(typescript)]` give the generated client a
//! `typescript()` function: a module that declares the agent's `Methods` (each method's
//! arguments, result and error), its `Event` and `State`, and `Client`, the typed `AgentClient`
//! of `agents.js`. The types come from [ts-rs](https://docs.rs/ts-rs): every type a method
//! names derives `ts_rs::TS`. 64-bit integers are `number`, as the JSON the agent sends has them.
//!
//! ```ts
//! import { connect } from "./agents.js";
//! import type { Methods, Event, State } from "./shop.js";   // the generated declarations
//! const shop = await connect<Methods, Event, State>(url);
//! const total: number = await shop.call("add", [{ sku: "tea", count: 2 }]);   // checked
//! ```

use std::{any::TypeId, collections::HashSet, fmt::Write};

use ts_rs::{TypeVisitor, TS};

/// The TypeScript of a module's types: each named type declared once, with the types it
/// depends on, and referred to by name.
pub struct Declarations {
    cfg: ts_rs::Config,
    seen: HashSet<TypeId>,
    out: String,
}

impl Default for Declarations {
    fn default() -> Self {
        Declarations {
            // 64-bit integers are numbers in the JSON the agent sends.
            cfg: ts_rs::Config::new().with_large_int("number"),
            seen: HashSet::new(),
            out: String::new(),
        }
    }
}

impl Declarations {
    /// No declarations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The TypeScript type of `T`, declaring `T` (if it is a named type) and what it uses.
    pub fn ty<T: TS + 'static + ?Sized>(&mut self) -> String {
        self.declare::<T>();
        T::name(&self.cfg)
    }

    fn declare<T: TS + 'static + ?Sized>(&mut self) {
        if T::output_path().is_some() {
            if !self.seen.insert(TypeId::of::<T>()) {
                return;
            }
            let _ = writeln!(self.out, "export {}\n", T::decl(&self.cfg));
        }
        struct Visit<'a>(&'a mut Declarations);
        impl TypeVisitor for Visit<'_> {
            fn visit<U: TS + 'static + ?Sized>(&mut self) {
                self.0.declare::<U>();
            }
        }
        T::visit_dependencies(&mut Visit(self));
    }

    /// The declarations module of the agent (or interface) `name`.
    pub fn module(&self, name: &str, methods: &[Method], event: &str, state: &str) -> String {
        module(name, &self.out, methods, event, state)
    }
}

/// One method, its types already in TypeScript.
#[derive(Debug, Clone)]
pub struct Method {
    /// The wire name.
    pub name: &'static str,
    /// The parameters' names and types.
    pub params: Vec<(&'static str, String)>,
    /// The result's type.
    pub result: String,
    /// The application error's type (`never` for a method that cannot fail).
    pub error: String,
}

/// The declarations module of `name`: the named types `types`, then its methods, event and
/// state.
fn module(name: &str, types: &str, methods: &[Method], event: &str, state: &str) -> String {
    let mut out = format!(
        "// TypeScript declarations of `{name}`, generated from its Rust definitions by agents.\n\
         import type {{ AgentClient }} from \"./agents.js\";\n\n{types}\
         /** Each method: its arguments (positional), its result, its application error. */\n\
         export interface Methods {{\n"
    );
    for m in methods {
        let params: Vec<String> = m.params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        let _ = writeln!(
            out,
            "  {:?}: {{ args: [{}]; result: {}; error: {} }};",
            m.name,
            params.join(", "),
            m.result,
            m.error
        );
    }
    let _ = write!(
        out,
        "}}\n\n/** What the agent sends to connections. */\nexport type Event = {event};\n\n\
         /** The agent's shared state. */\nexport type State = {state};\n\n\
         /** A connection to the agent, typed. */\nexport type Client = AgentClient<Methods, Event, State>;\n"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_declares_methods_events_and_state() {
        let mut d = Declarations::new();
        let m = Method {
            name: "add",
            params: vec![("by", d.ty::<i64>())],
            result: d.ty::<Vec<u64>>(),
            error: "never".into(),
        };
        let ts = d.module("counter", &[m], "null", "null");
        assert!(
            ts.contains(r#""add": { args: [by: number]; result: Array<number>; error: never };"#),
            "{ts}"
        );
        assert!(
            ts.contains("export type Client = AgentClient<Methods, Event, State>;"),
            "{ts}"
        );
    }
}
