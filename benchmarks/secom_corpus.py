"""A long-conversation QA corpus with known topics and evidence, for SeCom's benchmarks.

Each conversation has several sessions; each session talks through a few topics, a run of
exchanges per topic (so true segment boundaries are known). Some exchanges state a fact,
others chat about the topic around it. A fact comes in one of two styles, half each:
- direct: one exchange says it all ("My dog is called Biscuit.");
- in context: an exchange sets the subject up ("We adopted a puppy from the shelter.") and
  the next one states the fact without naming it ("She is called Biscuit."), as people talk.
Questions come after the last session and ask for a fact stated in an earlier one, with the
evidence exchange (the one holding the answer) and a short answer (exact match). Seeded; no
model and no network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# topic -> (chat lines the user may say, facts: (statement template, question, answers))
TOPICS: dict[str, tuple[list[str], list[tuple[str, str, list[str]]]]] = {
    "pets": (["I took the dog to the park this morning.", "Do cats really sleep 16 hours a day?",
              "We are thinking about getting a second pet.", "The vet visit went fine."],
             [("My dog is called {a}.", "What is my dog called?",
               ["Biscuit", "Pepper", "Mochi", "Rex", "Olive"]),
              ("My cat {a} likes to sit on the keyboard.", "What is my cat's name?",
               ["Luna", "Tiger", "Miso", "Felix", "Nala"])]),
    "travel": (["I am planning a trip for the summer.", "How long does a flight to Asia take?",
                "I always forget my charger when I travel.", "Hotels near the station are pricey."],
               [("I am flying to {a} in June.", "Where am I flying in June?",
                 ["Lisbon", "Osaka", "Reykjavik", "Nairobi", "Quito"]),
                ("My passport expires in {a}.", "When does my passport expire?",
                 ["March", "August", "November", "January", "October"])]),
    "cooking": (["I tried a new recipe last night.", "How do I keep rice from sticking?",
                 "My oven runs a little hot.", "I want to cook more vegetables."],
                [("My favourite dish is {a}.", "What is my favourite dish?",
                  ["lasagna", "ramen", "paella", "curry", "risotto"]),
                 ("I am allergic to {a}.", "What am I allergic to?",
                  ["peanuts", "shellfish", "sesame", "kiwi", "mustard"])]),
    "work": (["The project deadline moved again.", "Meetings take up half my week.",
              "I should ask for a new monitor.", "My manager liked the report."],
             [("My team lead is named {a}.", "What is my team lead's name?",
               ["Priya", "Tomasz", "Keiko", "Andre", "Fatima"]),
              ("Our project is code-named {a}.", "What is our project's code name?",
               ["Falcon", "Juniper", "Atlas", "Nimbus", "Quartz"])]),
    "fitness": (["I went for a run after work.", "My knees hurt after squats.",
                 "Is it better to train in the morning?", "I am drinking more water now."],
                [("I run {a} kilometres every Sunday.", "How many kilometres do I run on Sundays?",
                  ["five", "eight", "ten", "twelve", "fifteen"]),
                 ("My gym is on {a} Street.", "On which street is my gym?",
                  ["Maple", "Harbor", "Elm", "Station", "Mill"])]),
    "books": (["I finished a novel on the train.", "Do you like science fiction?",
               "I keep buying books I never read.", "Audiobooks help on long drives."],
              [("The book I am reading now is {a}.", "Which book am I reading now?",
                ["Dune", "Emma", "Beloved", "Solaris", "Ulysses"]),
               ("My book club meets on {a}.", "On which day does my book club meet?",
                ["Tuesday", "Thursday", "Friday", "Monday", "Saturday"])]),
}
# question -> (setup exchange, the fact said without naming its subject)
IN_CONTEXT: dict[str, tuple[str, str]] = {
    "What is my dog called?": ("We adopted a puppy from the shelter.", "She is called {a}."),
    "What is my cat's name?": ("The cat keeps walking over my laptop.", "{a} did it again today."),
    "Where am I flying in June?": ("I finally booked the June flights.", "It is {a}, finally!"),
    "When does my passport expire?": ("I checked my passport yesterday.", "It runs out in {a}."),
    "What is my favourite dish?": ("Let me tell you what I love to eat most.",
                                   "Nothing beats {a}."),
    "What am I allergic to?": ("I had an allergic reaction at dinner.", "It was the {a} again."),
    "What is my team lead's name?": ("We got a new team lead this month.",
                                     "{a} seems very organised."),
    "What is our project's code name?": ("Our new project finally has a code name.",
                                         "It is {a}."),
    "How many kilometres do I run on Sundays?": ("Sunday runs are my routine now.",
                                                 "I do {a} kilometres each time."),
    "On which street is my gym?": ("I joined a new gym near home.", "It is on {a} Street."),
    "Which book am I reading now?": ("I started a new book this week.", "It is {a}."),
    "On which day does my book club meet?": ("I joined a book club.",
                                             "We meet every {a} evening."),
}
ASSISTANT = ["That sounds good.", "Thanks for telling me.", "I will keep that in mind.",
             "Interesting, tell me more.", "That makes sense."]


@dataclass
class Conversation:
    sessions: list[list[tuple[str, str]]]  # per session: (user, assistant) exchanges
    topics: list[str]  # topic of every exchange, flattened over sessions
    questions: list[dict] = field(default_factory=list)  # question, answer, evidence index

    @property
    def exchanges(self) -> list[tuple[str, str]]:
        return [exchange for session in self.sessions for exchange in session]

    def true_segments(self) -> list[tuple[int, int]]:
        """Runs of one topic, not crossing sessions (inclusive exchange indices)."""
        segments, start, index = [], 0, 0
        for session in self.sessions:
            for offset in range(len(session)):
                at = index + offset
                last_of_run = (offset == len(session) - 1
                               or self.topics[at + 1] != self.topics[at])
                if last_of_run:
                    segments.append((start, at))
                    start = at + 1
            index += len(session)
        return segments


def make_conversation(seed: int, sessions: int = 4, topics_per_session: int = 3,
                      exchanges_per_topic: tuple[int, int] = (3, 6)) -> Conversation:
    rng = random.Random(seed)
    conversation = Conversation([], [])
    for session_index in range(sessions):
        session: list[tuple[str, str]] = []
        for topic in rng.sample(sorted(TOPICS), topics_per_session):
            chat, fact_templates = TOPICS[topic]
            count = rng.randint(*exchanges_per_topic)
            fact_at = rng.randrange(1, count)  # room for a set-up exchange before it
            fact_user: dict[int, str] = {}
            if session_index < sessions - 1:
                template, question, answers = rng.choice(fact_templates)
                if question not in {q["question"] for q in conversation.questions}:
                    answer = rng.choice(answers)
                    style = rng.choice(["direct", "in_context"])
                    if style == "direct":
                        fact_user[fact_at] = template.format(a=answer)
                    else:
                        setup, stated = IN_CONTEXT[question]
                        fact_user[fact_at - 1] = setup
                        fact_user[fact_at] = stated.format(a=answer)
                    conversation.questions.append({
                        "question": question, "answer": answer, "topic": topic,
                        "style": style, "evidence": len(conversation.topics) + fact_at,
                        "session": session_index})
            for position in range(count):
                user = fact_user.get(position) or rng.choice(chat)
                session.append((user, rng.choice(ASSISTANT)))
                conversation.topics.append(topic)
        conversation.sessions.append(session)
    return conversation


def make_corpus(count: int, seed: int = 0, **kwargs) -> list[Conversation]:
    return [make_conversation(seed * 10_000 + index, **kwargs) for index in range(count)]
