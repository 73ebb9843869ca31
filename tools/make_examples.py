#!/usr/bin/env python3
"""Deterministic generator of sftd's example tool-calling dataset.

Writes rows in the OpenAI/TRL conversational format, one JSON object per line:

    {"messages": [...], "tools": [...]}

with system/user/assistant/tool roles, assistant ``tool_calls`` of the form
``{"id": ..., "type": "function", "function": {"name": ..., "arguments": {...}}}`` (a few rows carry
``arguments`` as a JSON string instead of an object) and ``role: "tool"`` results carrying
``tool_call_id`` and ``name``.

Scenarios: single calls, parallel calls, multi-step chains, clarifying questions, refusals of
dangerous requests, plain answers (with and without tools), follow-up turns, a few non-ASCII strings.

Only the standard library is used; the output depends on nothing but --seed and --rows.
Floats in tool-call arguments are kept to short decimals that Python prints without an exponent.

    python3 tools/make_examples.py --seed 1234 --rows 400 --out examples/tool_calls.jsonl
    python3 tools/make_examples.py --seed 98765 --rows 40 --out examples/tool_calls_val.jsonl
"""

import argparse
import json
import random
import sys

from examples_vocab import (
    AIRPORTS, CALC_CASES, CITIES, CONDITIONS, EVENT_TITLES, FILES, MONTHS, PEOPLE, PLAIN_QA,
    REFUSALS, REMINDER_TEXTS, SEARCH_QUERIES, STOCKS, SYSTEM_PROMPTS, TOOL_NAMES, TOOLS, UNIT_CASES,
)


class Gen:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.stats = {}

    # ---- helpers -------------------------------------------------------------------------
    def pick(self, xs):
        return self.rng.choice(xs)

    def call_id(self):
        return "call_" + "".join(self.rng.choice("0123456789abcdef") for _ in range(8))

    def date(self):
        return "2026-%02d-%02d" % (self.rng.randint(1, 12), self.rng.randint(1, 28))

    def human_date(self, iso):
        _, m, d = iso.split("-")
        return "%s %d" % (MONTHS[int(m) - 1], int(d))

    def time(self):
        return "%02d:%s" % (self.rng.randint(7, 19), self.pick(["00", "15", "30", "45"]))

    def tools_for(self, needed, extra=None):
        """The needed tools plus (usually no, sometimes one) distractor, in a seeded order."""
        names = list(dict.fromkeys(needed))
        n_extra = self.pick([0, 0, 1]) if extra is None else extra
        others = [t for t in TOOL_NAMES if t not in names]
        names += self.rng.sample(others, n_extra)
        self.rng.shuffle(names)
        return [TOOLS[n] for n in names]

    def system(self, messages, p=0.75):
        if self.rng.random() < p:
            return [{"role": "system", "content": self.pick(SYSTEM_PROMPTS)}] + messages
        return messages

    @staticmethod
    def call(cid, name, args):
        return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}

    @staticmethod
    def tool_msg(cid, name, result):
        return {"role": "tool", "tool_call_id": cid, "name": name,
                "content": json.dumps(result, ensure_ascii=False)}

    # ---- single tools: (user text, tool name, args, result, final answer) ---------------------
    def weather_case(self):
        city, _ = self.pick(CITIES)
        unit = self.pick(["celsius", "celsius", "fahrenheit"])
        t_c = self.rng.randint(-8, 34)
        temp = t_c if unit == "celsius" else round(t_c * 9 / 5 + 32)
        sym = "°C" if unit == "celsius" else "°F"
        cond = self.pick(CONDITIONS)
        asks = [
            "What's the weather like in {c} right now?", "Is it cold in {c} today?",
            "Weather in {c}, please.", "Do I need an umbrella in {c}?", "How warm is it in {c}?",
        ]
        user = self.pick(asks).format(c=city)
        args = {"city": city}
        if unit == "fahrenheit":
            user += " Use Fahrenheit."
            args["unit"] = "fahrenheit"
        elif self.rng.random() < 0.4:
            args["unit"] = "celsius"
        hum = self.rng.randint(30, 95)
        result = {"city": city, "temperature": temp, "unit": unit, "condition": cond, "humidity": hum}
        umbrella = " Take an umbrella." if "rain" in cond else ""
        answer = "It's currently %d%s and %s in %s, with %d%% humidity.%s" % (temp, sym, cond, city, hum, umbrella)
        return user, "get_weather", args, result, answer

    def event_case(self):
        person, _ = self.pick(PEOPLE)
        title = self.pick(EVENT_TITLES).format(p=person)
        date, time = self.date(), self.time()
        dur = self.pick([15, 30, 45, 60, 90])
        args = {"title": title, "date": date, "time": time, "duration_minutes": dur}
        user = "Put '%s' on my calendar for %s at %s, %d minutes." % (title, self.human_date(date), time, dur)
        if self.rng.random() < 0.4:
            others = self.rng.sample(PEOPLE, 2)
            args["attendees"] = [e for _, e in others]
            user += " Invite %s and %s." % (others[0][0], others[1][0])
        eid = "evt_%04d" % self.rng.randint(0, 9999)
        result = {"status": "created", "event_id": eid}
        answer = "Done — '%s' is on your calendar for %s at %s (%d min)." % (title, self.human_date(date), time, dur)
        if "attendees" in args:
            answer += " Invitations were sent."
        return user, "create_event", args, result, answer

    def email_case(self):
        name, addr = self.pick(PEOPLE)
        topic = self.pick([
            ("Running late", "Hi {n}, I'm running about 15 minutes late. Sorry!"),
            ("Lunch tomorrow?", "Hi {n}, are you free for lunch tomorrow at 12:30?"),
            ("Slides for Monday", "Hi {n}, the slides for Monday are attached in the shared folder."),
            ("Thank you", "Hi {n}, thanks a lot for your help with the release."),
            ("Q3 report <draft> & notes", "Hi {n}, here is the \"draft\" of the Q3 report. Comments welcome."),
        ])
        subject, body = topic[0], topic[1].format(n=name)
        user = self.pick([
            "Email {n} ({a}) with the subject \"{s}\" saying: {b}",
            "Send {a} an email, subject \"{s}\", body: {b}",
        ]).format(n=name, a=addr, s=subject, b=body)
        args = {"to": addr, "subject": subject, "body": body}
        result = {"status": "sent", "message_id": "msg_%05d" % self.rng.randint(0, 99999)}
        answer = "Your email \"%s\" to %s has been sent." % (subject, name)
        return user, "send_email", args, result, answer

    def flight_case(self):
        (oc, o), (dc, d) = self.rng.sample(AIRPORTS, 2)
        date = self.date()
        pax = self.pick([1, 1, 2, 3, 4])
        args = {"origin": o, "destination": d, "date": date}
        user = "Find flights from %s to %s on %s" % (oc, dc, self.human_date(date))
        if pax > 1:
            args["passengers"] = pax
            user += " for %d people" % pax
        if self.rng.random() < 0.35:
            args["nonstop"] = True
            user += ", nonstop only"
        user += "."
        price1 = self.rng.randint(60, 900)
        price2 = price1 + self.rng.randint(10, 200)
        dep1, dep2 = self.time(), self.time()
        flights = [
            {"flight": "%s%d" % (self.pick(["LH", "AF", "BA", "IB", "UA", "NH", "LX"]), self.rng.randint(100, 999)),
             "departure": dep1, "price_eur": price1, "stops": 0},
            {"flight": "%s%d" % (self.pick(["KL", "TP", "SK", "AC", "DL"]), self.rng.randint(100, 999)),
             "departure": dep2, "price_eur": price2, "stops": 0 if args.get("nonstop") else 1},
        ]
        result = {"flights": flights}
        answer = ("I found %d options from %s to %s on %s: %s at %s for €%d, and %s at %s for €%d. "
                  "The cheapest is %s.") % (
            len(flights), o, d, self.human_date(date), flights[0]["flight"], dep1, price1,
            flights[1]["flight"], dep2, price2, flights[0]["flight"])
        return user, "search_flights", args, result, answer

    def calc_case(self):
        text, expr = self.pick(CALC_CASES)
        value = eval(expr, {"__builtins__": {}})  # noqa: S307 (fixed, trusted expressions)
        value = round(value, 4)
        if float(value).is_integer():
            value = int(value)
        user = self.pick(["What is {t}?", "Calculate {t}.", "Quick math: {t}?"]).format(t=text)
        return user, "calculate", {"expression": expr}, {"result": value}, "%s is %s." % (text[0].upper() + text[1:], value)

    def file_case(self):
        path, content = self.pick(FILES)
        user = self.pick(["What's in {p}?", "Can you show me the contents of {p}?", "Open {p} and tell me what it says."]).format(p=path)
        first = content.splitlines()[0].lstrip("# ")
        answer = "Here's what %s contains:\n\n%s" % (path, content) if self.rng.random() < 0.5 else \
            "%s starts with \"%s\" and has %d lines in total." % (path, first, len(content.splitlines()))
        return user, "read_file", {"path": path}, {"path": path, "content": content}, answer

    def stock_case(self):
        sym, name = self.pick(STOCKS)
        price = round(self.rng.uniform(20, 900), 2)
        change = round(self.rng.uniform(-4, 4), 2)
        user = self.pick(["How is {n} stock doing?", "What's the price of {s}?", "Current {s} quote?"]).format(n=name, s=sym)
        result = {"symbol": sym, "price": price, "currency": "USD", "change_percent": change}
        direction = "up" if change >= 0 else "down"
        answer = "%s (%s) is trading at $%.2f, %s %.2f%% today." % (name, sym, price, direction, abs(change))
        return user, "get_stock_price", {"symbol": sym}, result, answer

    def unit_case(self):
        value, fu, tu, factor = self.pick(UNIT_CASES)
        if fu == "F":
            out = round((value - 32) * 5 / 9, 2)
        elif fu == "C":
            out = round(value * 9 / 5 + 32, 2)
        else:
            out = round(value * factor, 2)
        user = self.pick(["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?"]).format(v=value, f=fu, t=tu)
        args = {"value": value, "from_unit": fu, "to_unit": tu}
        return user, "convert_units", args, {"value": out, "unit": tu}, "%s %s is %s %s." % (value, fu, out, tu)

    def search_case(self):
        q, snippet = self.pick(SEARCH_QUERIES)
        user = self.pick(["Look up: {q}", "Can you search the web for {q}?", "I'd like to know: {q}"]).format(q=q)
        args = {"query": q}
        if self.rng.random() < 0.4:
            args["max_results"] = self.pick([3, 5])
        result = {"results": [{"title": q.title(), "snippet": snippet, "url": "https://example.com/%d" % self.rng.randint(1, 999)}]}
        return user, "web_search", args, result, "According to the search results: " + snippet

    def reminder_case(self):
        person, _ = self.pick(PEOPLE)
        text = self.pick(REMINDER_TEXTS).format(p=person)
        date, time = self.date(), self.time()
        repeat = self.pick(["none", "none", "daily", "weekly"])
        user = "Remind me to %s on %s at %s" % (text, self.human_date(date), time)
        args = {"text": text, "time": "%sT%s:00" % (date, time)}
        if repeat != "none":
            user += ", every %s" % ("day" if repeat == "daily" else "week")
            args["repeat"] = repeat
        user += "."
        result = {"status": "scheduled", "reminder_id": "rem_%04d" % self.rng.randint(0, 9999)}
        answer = "Reminder set: %s on %s at %s%s." % (text, self.human_date(date), time,
                                                      "" if repeat == "none" else " (" + repeat + ")")
        return user, "set_reminder", args, result, answer

    def single_case(self):
        return self.pick([self.weather_case, self.event_case, self.email_case, self.flight_case, self.calc_case,
                          self.file_case, self.stock_case, self.unit_case, self.search_case, self.reminder_case])()

    # ---- scenarios --------------------------------------------------------------------------
    def single(self):
        user, name, args, result, answer = self.single_case()
        cid = self.call_id()
        pre = self.pick(["", "", "", "Let me check that for you."])
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": pre, "tool_calls": [self.call(cid, name, args)]},
            self.tool_msg(cid, name, result),
            {"role": "assistant", "content": answer},
        ]
        return self.system(msgs), self.tools_for([name])

    def parallel(self):
        kind = self.pick(["weather", "stock", "mixed"])
        if kind == "weather":
            cases = []
            while len(cases) < self.pick([2, 2, 3]):
                c = self.weather_case()
                if all(c[2]["city"] != o[2]["city"] for o in cases):
                    cases.append(c)
            cities = [c[2]["city"] for c in cases]
            user = "Compare the weather in %s and %s." % (", ".join(cities[:-1]), cities[-1])
            for c in cases:
                c[2].pop("unit", None)
                c[3]["unit"] = "celsius"
        elif kind == "stock":
            cases = []
            while len(cases) < 2:
                c = self.stock_case()
                if all(c[2]["symbol"] != o[2]["symbol"] for o in cases):
                    cases.append(c)
            user = "How are %s and %s doing today?" % (cases[0][2]["symbol"], cases[1][2]["symbol"])
        else:
            a = self.pick([self.weather_case, self.stock_case, self.unit_case])()
            b = self.pick([self.reminder_case, self.event_case, self.calc_case])()
            cases = [a, b]
            user = "Two things: %s Also, %s" % (a[0], b[0][0].lower() + b[0][1:])
        cids = [self.call_id() for _ in cases]
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": "", "tool_calls": [self.call(i, c[1], c[2]) for i, c in zip(cids, cases)]}]
        msgs += [self.tool_msg(i, c[1], c[3]) for i, c in zip(cids, cases)]
        if kind == "weather":
            answer = " ".join("%s: %d°C, %s." % (c[2]["city"], c[3]["temperature"], c[3]["condition"]) for c in cases)
            warmest = max(cases, key=lambda c: c[3]["temperature"])
            answer += " %s is the warmest right now." % warmest[2]["city"]
        else:
            answer = " ".join(c[4] for c in cases)
        msgs.append({"role": "assistant", "content": answer})
        return self.system(msgs), self.tools_for([c[1] for c in cases])

    def chain(self):
        kind = self.pick(["stock_calc", "flight_event", "file_email", "weather_reminder", "search_email", "weather_convert"])
        c1, c2 = self.call_id(), self.call_id()
        if kind == "stock_calc":
            _, _, a1, r1, _ = self.stock_case()
            n = self.pick([3, 10, 25, 40, 120])
            user = "What are my %d shares of %s worth right now?" % (n, a1["symbol"])
            expr = "%d * %.2f" % (n, r1["price"])
            total = round(n * r1["price"], 2)
            steps = [("get_stock_price", a1, r1, ""),
                     ("calculate", {"expression": expr}, {"result": total}, "")]
            answer = "%s is at $%.2f, so your %d shares are worth $%.2f." % (a1["symbol"], r1["price"], n, total)
        elif kind == "flight_event":
            _, _, a1, r1, _ = self.flight_case()
            f = r1["flights"][0]
            user = "Find me a flight from %s to %s on %s and put the cheapest one in my calendar." % (
                a1["origin"], a1["destination"], self.human_date(a1["date"]))
            a2 = {"title": "Flight %s %s→%s" % (f["flight"], a1["origin"], a1["destination"]),
                  "date": a1["date"], "time": f["departure"], "duration_minutes": self.pick([90, 120, 180, 600])}
            steps = [("search_flights", a1, r1, ""),
                     ("create_event", a2, {"status": "created", "event_id": "evt_%04d" % self.rng.randint(0, 9999)},
                      "The cheapest option is %s at %s for €%d. Adding it to your calendar." % (f["flight"], f["departure"], f["price_eur"]))]
            answer = "Booked in your calendar: %s departing %s at %s (€%d)." % (f["flight"], self.human_date(a1["date"]), f["departure"], f["price_eur"])
        elif kind == "file_email":
            path, content = self.pick(FILES)
            name, addr = self.pick(PEOPLE)
            user = "Read %s and email a short summary to %s (%s)." % (path, name, addr)
            lines = content.splitlines()
            summary = "Summary of %s: %s" % (path, "; ".join(l.strip("#- ").strip() for l in lines if l.strip("#- ").strip())[:160])
            steps = [("read_file", {"path": path}, {"path": path, "content": content}, ""),
                     ("send_email", {"to": addr, "subject": "Summary of " + path, "body": summary},
                      {"status": "sent", "message_id": "msg_%05d" % self.rng.randint(0, 99999)}, "")]
            answer = "I read %s and sent %s a summary." % (path, name)
        elif kind == "weather_reminder":
            _, _, a1, r1, _ = self.weather_case()
            a1.pop("unit", None)
            r1["unit"] = "celsius"
            date = self.date()
            user = "Check the weather in %s, and if it's rainy remind me tomorrow at 08:00 to take an umbrella." % a1["city"]
            if "rain" not in r1["condition"]:
                r1["condition"] = self.pick(["light rain", "heavy rain"])
            a2 = {"text": "take an umbrella", "time": "%sT08:00:00" % date}
            steps = [("get_weather", a1, r1, ""),
                     ("set_reminder", a2, {"status": "scheduled", "reminder_id": "rem_%04d" % self.rng.randint(0, 9999)},
                      "It's %s in %s, so I'll set the reminder." % (r1["condition"], a1["city"]))]
            answer = "It's %s in %s (%d°C). I set a reminder for 08:00 tomorrow to take an umbrella." % (r1["condition"], a1["city"], r1["temperature"])
        elif kind == "search_email":
            q, snippet = self.pick(SEARCH_QUERIES)
            name, addr = self.pick(PEOPLE)
            user = "Look up %s and send what you find to %s." % (q, addr)
            steps = [("web_search", {"query": q}, {"results": [{"title": q.title(), "snippet": snippet}]}, ""),
                     ("send_email", {"to": addr, "subject": q[0].upper() + q[1:], "body": snippet},
                      {"status": "sent", "message_id": "msg_%05d" % self.rng.randint(0, 99999)}, "")]
            answer = "Found it: %s I've emailed this to %s." % (snippet, name)
        else:
            _, _, a1, r1, _ = self.weather_case()
            a1.pop("unit", None)
            r1["unit"] = "celsius"
            user = "What's the temperature in %s in Fahrenheit? The weather service only gives Celsius." % a1["city"]
            f = round(r1["temperature"] * 9 / 5 + 32, 1)
            steps = [("get_weather", a1, r1, ""),
                     ("convert_units", {"value": r1["temperature"], "from_unit": "C", "to_unit": "F"}, {"value": f, "unit": "F"}, "")]
            answer = "It's %d°C in %s, which is %s°F." % (r1["temperature"], a1["city"], f)
        msgs = [{"role": "user", "content": user}]
        for cid, (name, args, result, pre) in zip([c1, c2], steps):
            msgs.append({"role": "assistant", "content": pre, "tool_calls": [self.call(cid, name, args)]})
            msgs.append(self.tool_msg(cid, name, result))
        msgs.append({"role": "assistant", "content": answer})
        return self.system(msgs), self.tools_for([s[0] for s in steps])

    def clarify(self):
        kind = self.pick(["flight", "email", "reminder", "weather", "event"])
        if kind == "flight":
            _, _, args, result, answer = self.flight_case()
            dest = [c for c, code in AIRPORTS if code == args["destination"]][0]
            origin = [c for c, code in AIRPORTS if code == args["origin"]][0]
            ask_user = "I need a flight to %s." % dest
            question = "Sure — where will you be flying from, and on which date?"
            reply = "From %s, on %s." % (origin, self.human_date(args["date"]))
            args.pop("passengers", None)
            args.pop("nonstop", None)
            name = "search_flights"
        elif kind == "email":
            _, _, args, result, answer = self.email_case()
            ask_user = "Send an email to my colleague about the meeting."
            question = "Happy to. What's your colleague's email address, and what should the email say?"
            reply = "It's %s. Subject \"%s\", and say: %s" % (args["to"], args["subject"], args["body"])
            name = "send_email"
        elif kind == "reminder":
            _, _, args, result, answer = self.reminder_case()
            ask_user = "Remind me to %s." % args["text"]
            question = "When should I remind you?"
            d, t = args["time"].split("T")
            reply = "%s at %s." % (self.human_date(d), t[:5])
            args.pop("repeat", None)
            answer = "Reminder set: %s on %s at %s." % (args["text"], self.human_date(d), t[:5])
            name = "set_reminder"
        elif kind == "weather":
            _, _, args, result, answer = self.weather_case()
            ask_user = self.pick(["What's the weather like?", "Is it going to rain?", "How's the weather?"])
            question = "Which city would you like the weather for?"
            reply = args["city"]
            name = "get_weather"
        else:
            _, _, args, result, answer = self.event_case()
            ask_user = "Schedule '%s' for me." % args["title"]
            question = "Sure. On what date and at what time, and how long should it be?"
            reply = "%s at %s, %d minutes." % (self.human_date(args["date"]), args["time"], args["duration_minutes"])
            args.pop("attendees", None)
            answer = "Done — '%s' is on your calendar for %s at %s." % (args["title"], self.human_date(args["date"]), args["time"])
            name = "create_event"
        msgs = [{"role": "user", "content": ask_user}, {"role": "assistant", "content": question}]
        if self.rng.random() < 0.6:
            cid = self.call_id()
            msgs += [
                {"role": "user", "content": reply},
                {"role": "assistant", "content": "", "tool_calls": [self.call(cid, name, args)]},
                self.tool_msg(cid, name, result),
                {"role": "assistant", "content": answer},
            ]
        return self.system(msgs), self.tools_for([name])

    def refusal(self):
        text, needed, answer = self.pick(REFUSALS)
        _, addr = self.pick(PEOPLE)
        msgs = [{"role": "user", "content": text.format(e=addr)}, {"role": "assistant", "content": answer}]
        return self.system(msgs, p=0.9), self.tools_for(needed)

    def plain(self):
        q, a = self.pick(PLAIN_QA)
        msgs = self.system([{"role": "user", "content": q}, {"role": "assistant", "content": a}], p=0.6)
        if self.rng.random() < 0.3:
            return msgs, None  # a row without tools at all
        return msgs, self.tools_for([], extra=self.rng.randint(1, 2))

    def followup(self):
        """A tool-using turn, then a second user turn answered with another tool call."""
        u1, n1, a1, r1, ans1 = self.single_case()
        u2, n2, a2, r2, ans2 = self.single_case()
        c1, c2 = self.call_id(), self.call_id()
        msgs = [
            {"role": "user", "content": u1},
            {"role": "assistant", "content": "", "tool_calls": [self.call(c1, n1, a1)]},
            self.tool_msg(c1, n1, r1),
            {"role": "assistant", "content": ans1},
            {"role": "user", "content": self.pick(["Thanks! ", "Great. ", "", "Perfect, and one more thing: "]) + u2},
            {"role": "assistant", "content": "", "tool_calls": [self.call(c2, n2, a2)]},
            self.tool_msg(c2, n2, r2),
            {"role": "assistant", "content": ans2},
        ]
        return self.system(msgs), self.tools_for([n1, n2], extra=0)

    def row(self):
        scenario = self.rng.choices(
            [self.single, self.parallel, self.chain, self.clarify, self.refusal, self.plain, self.followup],
            weights=[30, 12, 18, 12, 10, 11, 7])[0]
        messages, tools = scenario()
        self.stats[scenario.__name__] = self.stats.get(scenario.__name__, 0) + 1
        # ~15% of the rows that have tool calls carry the arguments as a JSON string.
        if self.rng.random() < 0.15:
            for m in messages:
                for tc in m.get("tool_calls", []):
                    tc["function"]["arguments"] = json.dumps(tc["function"]["arguments"], ensure_ascii=False)
        row = {"messages": messages}
        if tools is not None:
            row["tools"] = tools
        return row


def check_floats(obj, where):
    """Reject floats whose Python repr uses an exponent (serde_json would print them differently)."""
    if isinstance(obj, float):
        r = repr(obj)
        if "e" in r or "E" in r or "inf" in r or "nan" in r:
            raise ValueError("float %s in %s prints with an exponent" % (r, where))
    elif isinstance(obj, dict):
        for v in obj.values():
            check_floats(v, where)
    elif isinstance(obj, list):
        for v in obj:
            check_floats(v, where)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    gen = Gen(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for i in range(args.rows):
            row = gen.row()
            check_floats(row, "row %d" % (i + 1))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print("%s: %d rows, scenarios %s" % (args.out, args.rows, json.dumps(gen.stats, sort_keys=True)), file=sys.stderr)


if __name__ == "__main__":
    main()
