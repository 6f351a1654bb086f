//! Tests of scenario parsing and checking: every refusal names its key, and the schedule
//! arithmetic sends what each phase promises.
//!
//! Contract: pure functions over TOML text (`parse`) and the shipped scenario files; no broker.

use super::*;

fn ok(text: &str) -> Scenario {
    parse("t.toml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(text: &str) -> String {
    parse("t.toml", text).expect_err("must be refused").0
}

const BASE: &str = "producers = 2\nconsumers = 2\n";

#[test]
fn every_shipped_scenario_parses() {
    let dir = scenarios_dir();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("scenarios dir") {
        let path = e.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert_eq!(
        n,
        SHIPPED.len(),
        "every file in scenarios/ is built in, and only those"
    );
    for (name, text) in SHIPPED {
        parse(name, text).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_zero_rate_ramp_names_the_key() {
    let e = refused(&format!(
        "{BASE}[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n\
         [[phases]]\nname = \"b\"\nduration_s = 1\nshape = \"sawtooth\"\nrate = 0\nperiod_s = 1\n"
    ));
    assert_eq!(e, "scenario t.toml: phases[1].rate: must be > 0 (got 0)");
}

#[test]
fn unknown_keys_are_refused() {
    let e = refused(&format!(
        "{BASE}consumer_rat = 5\n[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n"
    ));
    assert!(e.contains("unknown field `consumer_rat`"), "{e}");
    let e = refused(&format!(
        "{BASE}[[phases]]\nname = \"a\"\nduration_s = 1\nrat = 10\n"
    ));
    assert!(e.contains("unknown field `rat`"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let phase = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n";
    let cases = [
        ("queues = 0\n", "queues: must be >= 1"),
        ("size = 8\n", "size: must be >= 32"),
        (
            "size = { min = 64, max = 32 }\n",
            "size.max: must be >= size.min",
        ),
        ("batch = 0\n", "batch: must be >= 1"),
        (
            "prefetch = 10\nack_batch = 20\n",
            "ack_batch: must be <= prefetch",
        ),
        ("consumer_rate = -1\n", "consumer_rate: must be > 0"),
        (
            "consumers_start = \"nope\"\n",
            "consumers_start: no phase is named 'nope'",
        ),
        ("queues = 3\n", "consumers: must be >= queues"),
    ];
    for (line, want) in cases {
        let e = refused(&format!("{BASE}{line}{phase}"));
        assert!(e.contains(want), "{line:?}: {e}");
    }
    let e = refused(&format!(
        "{BASE}[[phases]]\nname = \"a\"\nduration_s = 0\nrate = 1\n"
    ));
    assert!(e.contains("phases[0].duration_s: must be > 0"), "{e}");
    let e = refused(&format!("{BASE}[[phases]]\nname = \"a\"\nduration_s = 1\n"));
    assert!(e.contains("phases[0].rate: missing"), "{e}");
    let e = refused(&format!(
        "{BASE}[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 1\nperiod_s = 3\n"
    ));
    assert!(
        e.contains("phases[0].period_s: not used by shape = \"constant\""),
        "{e}"
    );
    let e = refused(&format!("{BASE}phases = []\n"));
    assert!(e.contains("phases: at least one"), "{e}");
    let e = refused(&format!(
        "{BASE}[[phases]]\nname = \"a b\"\nduration_s = 1\nrate = 1\n"
    ));
    assert!(e.contains("phases[0].name"), "{e}");
    let e = refused(&format!(
        "{BASE}kind = \"max\"\n[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 1\n"
    ));
    assert!(
        e.contains("phases[0].rate: not used by kind = \"max\""),
        "{e}"
    );
    let e = refused(&format!("{BASE}batch = \"two\"\n{phase}"));
    assert!(e.contains("batch") && e.contains("invalid type"), "{e}");
    let e = refused(&format!("producers = 0\n{phase}"));
    assert!(e.contains("producers: must be >= 1"), "{e}");
}

#[test]
fn topic_patterns_match_as_the_broker_does() {
    for (p, k, want) in [
        ("orders.*", "orders.eu", true),
        ("orders.*", "orders.eu.new", false),
        ("orders.#", "orders", true),
        ("orders.#", "orders.eu.new", true),
        ("#", "anything.at.all", true),
        ("*.new", "orders.new", true),
        ("*.new", "new", false),
        ("a.#.z", "a.z", true),
        ("a.#.z", "a.b.c.z", true),
        ("a.#.z", "a.b.c", false),
    ] {
        assert_eq!(topic_matches(p, k), want, "{p} vs {k}");
    }
}

#[test]
fn exchange_keys_are_checked() {
    let phase = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n";
    let s = ok(&format!(
        "{BASE}queues = 2\n[exchange]\nkind = \"topic\"\nbinding_keys = [\"o.*\", \"o.#\"]\n\
         routing_keys = [\"o.eu\", \"o.eu.x\"]\n{phase}"
    ));
    let x = s.exchange.as_ref().expect("an exchange");
    assert_eq!(x.destinations("o.eu", 2), vec![0, 1]);
    assert_eq!(x.destinations("o.eu.x", 2), vec![1]);
    let e = refused(&format!(
        "{BASE}[exchange]\nkind = \"direct\"\nbinding_keys = [\"a\"]\n\
         routing_keys = [\"a\", \"b\"]\n{phase}"
    ));
    assert!(
        e.contains("exchange.routing_keys[1]: 'b' reaches no queue"),
        "{e}"
    );
    let e = refused(&format!(
        "{BASE}kind = \"rpc\"\n[exchange]\nkind = \"direct\"\nbinding_keys = [\"a\"]\n\
         routing_keys = [\"a\"]\n{phase}"
    ));
    assert!(e.contains("exchange: not used by kind = \"rpc\""), "{e}");
}

#[test]
fn constant_schedule_is_evenly_spaced() {
    let s = ok(&format!(
        "{BASE}[[phases]]\nname = \"a\"\nduration_s = 2\nrate = 100\n"
    ));
    let p = &s.phases[0];
    assert_eq!(p.message_count(), 200);
    let t = p.time_of(50, 0.0);
    assert!((t - 0.5).abs() < 1e-6, "{t}");
    assert_eq!(p.time_of(0, 0.0), 0.0);
}

#[test]
fn shapes_integrate_to_their_mean() {
    let mk = |extra: &str| {
        ok(&format!(
            "{BASE}[[phases]]\nname = \"a\"\nduration_s = 10\n{extra}\n"
        ))
        .phases[0]
            .clone()
    };
    let ramp = mk("shape = \"ramp\"\nrate = 0\nrate_end = 200");
    assert!((ramp.mean_rate() - 100.0).abs() < 1e-9);
    assert!((ramp.rate_at(5.0) - 100.0).abs() < 1e-9);
    let saw = mk("shape = \"sawtooth\"\nrate = 200\nrate_min = 0\nperiod_s = 2.5");
    assert!((saw.mean_rate() - 100.0).abs() < 1e-9);
    let sine = mk("shape = \"sine\"\nrate = 300\nrate_min = 100\nperiod_s = 10");
    assert!((sine.mean_rate() - 200.0).abs() < 1e-9);
    assert!((sine.rate_at(5.0) - 300.0).abs() < 1e-9);
    // Intended times are increasing and inside the phase.
    let mut last = 0.0;
    for k in 0..sine.message_count() {
        let t = sine.time_of(k, last);
        assert!(t >= last && t <= 10.0, "k {k}: {t} after {last}");
        last = t;
    }
}

#[test]
fn scaling_keeps_the_shape() {
    let mut s = ok(&format!(
        "{BASE}consumer_rate = 10\n[[phases]]\nname = \"a\"\nduration_s = 4\n\
         shape = \"sine\"\nrate = 100\nrate_min = 10\nperiod_s = 4\n"
    ));
    s.scale_rates(0.5);
    s.scale_durations(0.25);
    let p = &s.phases[0];
    assert_eq!(
        (p.rate, p.rate_min, p.duration_s, p.period_s),
        (Some(50.0), Some(5.0), 1.0, Some(1.0))
    );
    assert_eq!(s.consumer_rate, Some(5.0));
}

#[test]
fn the_speed_scenarios_say_what_the_issue_measures() {
    let get = |name: &str| {
        let (_, text) = SHIPPED
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is shipped"));
        parse(name, text).unwrap_or_else(|e| panic!("{e}"))
    };
    for name in [
        "max-per-message",
        "max-batch",
        "steady-5k",
        "steady-20k",
        "drain-after-restart",
    ] {
        let s = get(name);
        assert_eq!(s.size, Size::Fixed(1024), "{name}");
        assert_eq!((s.producers, s.consumers, s.queues), (1, 1, 1), "{name}");
        assert_eq!(s.prefetch, 1000, "{name}");
        assert!(s.persistent && s.durable, "{name}");
    }
    let m = get("max-per-message");
    assert_eq!(
        (m.kind, m.idiom, m.batch, m.ack_batch),
        (Kind::Max, Idiom::PerMessage, 1, 1)
    );
    assert_eq!(m.in_flight, 1000);
    let b = get("max-batch");
    assert_eq!(
        (b.kind, b.idiom, b.batch, b.ack_batch),
        (Kind::Max, Idiom::Batch, 64, 64)
    );
    assert_eq!(b.in_flight, 1000);
    for (name, rate) in [("steady-5k", 5000.0), ("steady-20k", 20000.0)] {
        let s = get(name);
        assert_eq!(
            (s.kind, s.idiom),
            (Kind::Queue, Idiom::PerMessage),
            "{name}"
        );
        assert_eq!(s.phases.len(), 1);
        assert_eq!(s.phases[0].mean_rate(), rate, "{name}");
    }
    let mut d = get("drain-after-restart");
    assert_eq!(
        (d.kind, d.idiom),
        (Kind::DrainAfterRestart, Idiom::PerMessage)
    );
    assert_eq!(d.backlog(), DEFAULT_BACKLOG);
    assert!(d.phases.is_empty());
    d.scale_durations(0.02);
    assert_eq!(d.backlog(), 2000, "--duration-scale scales the backlog");
    // `max` keeps its meaning: the older closed loop, batches of 64.
    let old = get("max");
    assert_eq!((old.idiom, old.batch, old.producers), (Idiom::Batch, 64, 2));
}

#[test]
fn a_bad_idiom_is_refused_naming_the_key() {
    let phase = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n";
    let e = refused(&format!("{BASE}idiom = \"permessage\"\n{phase}"));
    assert!(
        e.contains("idiom") && e.contains("unknown variant `permessage`"),
        "{e}"
    );
    let e = refused(&format!(
        "{BASE}idiom = \"per-message\"\nbatch = 64\n{phase}"
    ));
    assert!(
        e.contains("idiom: \"per-message\"") && e.contains("batch must be 1 (got 64)"),
        "{e}"
    );
    let e = refused(&format!(
        "{BASE}idiom = \"per-message\"\nprefetch = 100\nack_batch = 8\n{phase}"
    ));
    assert!(
        e.contains("idiom:") && e.contains("ack_batch must be 1 (got 8)"),
        "{e}"
    );
    let e = refused(&format!(
        "{BASE}kind = \"rpc\"\nidiom = \"per-message\"\n{phase}"
    ));
    assert!(e.contains("idiom: not used by kind = \"rpc\""), "{e}");
    let s = ok(&format!("{BASE}idiom = \"per-message\"\n{phase}"));
    assert_eq!(s.idiom, Idiom::PerMessage);
    assert_eq!(
        ok(&format!("{BASE}{phase}")).idiom,
        Idiom::Batch,
        "the default"
    );
}

#[test]
fn drain_after_restart_refuses_what_its_steps_would_ignore() {
    let k = "kind = \"drain-after-restart\"\n";
    let phase = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n";
    let s = ok(&format!("{BASE}{k}backlog = 500\n"));
    assert_eq!(s.backlog(), 500);
    for (line, want) in [
        (phase, "phases: not used by kind = \"drain-after-restart\""),
        ("durable = false\n", "durable: must be true"),
        ("persistent = false\n", "persistent: must be true"),
        ("backlog = 1\n", "backlog: must be >= producers (2)"),
        ("consumer_rate = 10\n", "consumer_rate: not used by kind"),
    ] {
        let e = refused(&format!("{BASE}{k}{line}"));
        assert!(e.contains(want), "{line:?}: {e}");
    }
    let e = refused(&format!("{BASE}backlog = 500\n{phase}"));
    assert!(e.contains("backlog: not used by kind = \"queue\""), "{e}");
}

#[test]
fn retry_keys_are_refused_where_unused_and_checked_where_used() {
    let phase = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n";
    let e = refused(&format!("{BASE}fail_share = 0.1\n{phase}"));
    assert!(
        e.contains("fail_share: not used by kind = \"queue\""),
        "{e}"
    );
    let retry = "kind = \"retry\"\n";
    ok(&format!("{retry}retry_delays_ms = [5, 10]\n{phase}"));
    for (extra, want) in [
        ("fail_share = 1.5\n", "fail_share: must be in (0, 1]"),
        (
            "retry_delays_ms = []\n",
            "retry_delays_ms: at least one delay",
        ),
        ("producers = 2\n", "producers: not used by kind = \"retry\""),
    ] {
        let e = refused(&format!("{retry}{extra}{phase}"));
        assert!(e.contains(want), "{extra}: {e}");
    }
    let e = refused(&format!("{retry}{phase}{phase}"));
    assert!(e.contains("exactly one [[phases]]"), "{e}");
}

#[test]
fn the_priority_scenario_is_one_backlog_and_one_trickle_and_others_are_refused() {
    let text = SHIPPED
        .iter()
        .find(|(n, _)| *n == "priority")
        .expect("shipped")
        .1;
    let mut s = ok(text);
    assert_eq!(
        (s.kind, s.backlog(), s.phases.len()),
        (Kind::Priority, 20_000, 1)
    );
    assert_eq!(s.phases[0].mean_rate(), 50.0);
    s.scale_durations(0.1);
    assert_eq!(s.backlog(), 2_000, "--duration-scale scales the backlog");
    let base = "kind = \"priority\"\nbacklog = 10\n";
    let phase = "[[phases]]\nname = \"t\"\nduration_s = 1\nrate = 10\n";
    assert!(
        refused(&format!("{base}producers = 2\nconsumers = 2\n{phase}"))
            .contains("producers: kind = \"priority\" runs one producer")
    );
    assert!(refused(base).contains("phases: kind = \"priority\" needs one constant phase"));
    assert!(refused(&format!("kind = \"priority\"\nbacklog = 0\n{phase}")).contains("backlog"));
}
