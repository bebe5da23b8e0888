"""A synthetic Reddit corpus with a planted truth, in Pushshift format, for `ahf demo`.

Real Reddit text cannot ship, and real votes come without the truth they are meant to reveal. This
corpus has both: text that reads as text, and a **hidden quality** per reply that the votes are driven
by, so the demo can measure how well each stage recovers it (ahf.validation).

Everything it writes is labelled synthetic: subreddits are named `synthetic_*`, authors `synth_*`,
and every record carries `"_synthetic": true`. The truth goes to a sidecar file (`truth.jsonl`, one
line per reply: its hidden quality and the dialog act the generator wrote), never into the dumps.

Four families of posts, one per dialog act the index stage looks for: writing prompts answered by
stories (`synthetic_stories`), ELI5 questions answered by explanations (`synthetic_explain`), plain
questions answered by short answers (`synthetic_questions`), and long posts answered by a TL;DR
(`synthetic_life`). Every top-level reply is written at one of four quality levels:

| level | kind | what it is | hidden quality |
|---|---|---|---|
| 3 | `specific` | on topic, coherent, about this post's particulars | 1.0 |
| 2 | `generic` | on topic, coherent, but vague: it could answer any post | 0.667 |
| 1 | `off_topic` | coherent chatter about something else | 0.333 |
| 0 | `garbled` | the right form, but fragments of unrelated sentences spliced together | 0.0 |

A reply's length is drawn before its level and filled to that length whatever the level, so length
says nothing about quality (the length baseline of the pairs stays near 0.5). Deeper replies are
reactions to their parent at the same four levels; their sentiment follows the parent's quality
(positive under good replies, negative under bad ones), which is what the feedback stage reads.

Votes follow the seed's picture of Reddit: a reply's score is driven by its quality, but also by how
popular its post is (post popularity scales every reply's votes and the post's own score) and by how
early it came (exposure falls with the delay after its parent and with its arrival order among its
siblings), times log-normal noise; deeper replies see fewer voters. Raw scores therefore mix quality
with popularity and timing, which the feedback stage's adjusted rank is meant to undo.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from mining.schema import base36

EPOCH = 1_600_000_000  # 2020-09-13, a fixed start so the corpus is the same on every machine
TRUTH_FILE = "truth.jsonl"

# The hidden quality of each kind of reply (the sidecar's `quality`), and how strongly voters favour it.
QUALITY = {"specific": 1.0, "generic": 2 / 3, "off_topic": 1 / 3, "garbled": 0.0}
_VOTE_APPEAL = {"specific": 2.0, "generic": 1.0, "off_topic": 0.5, "garbled": 0.25}
_TOP_LEVEL_KINDS = {"specific": 0.3, "generic": 0.3, "off_topic": 0.2, "garbled": 0.2}
_REACTION_KINDS = {"specific": 0.3, "generic": 0.35, "off_topic": 0.2, "garbled": 0.15}
_FAMILY_ACT = {"story": "story", "explain": "explanation", "question": "qa", "life": "summary"}
_SUBREDDIT = {"story": "synthetic_stories", "explain": "synthetic_explain", "question": "synthetic_questions",
              "life": "synthetic_life"}
# Words per reply, drawn before the quality level: (low, high) per family, and for reactions.
_LENGTH = {"story": (70, 130), "explain": (35, 55), "question": (8, 20), "life": (16, 40), "reaction": (7, 15)}

# -- what the text is made of ------------------------------------------------------------------------

# Writing prompts: who (title phrase, name, pronoun, possessive, place) and what happens (title phrase, object).
_CHARACTERS = [
    ("a lighthouse keeper", "Mara", "she", "her", "the lighthouse"),
    ("the last librarian", "Owen", "he", "his", "the library"),
    ("a retired astronaut", "Ruth", "she", "her", "the old launch site"),
    ("a dragon who hates gold", "Ember", "he", "his", "the cave"),
    ("a time traveller", "Jonah", "he", "his", "the station"),
    ("the town's only dentist", "Nell", "she", "her", "the clinic"),
    ("a talking cat", "Biscuit", "he", "his", "the kitchen"),
    ("a night shift nurse", "Leah", "she", "her", "the ward"),
]
_EVENTS = [
    ("finds a door that was not there yesterday", "the door"),
    ("receives a letter from the future", "the letter"),
    ("wakes up with everyone's memories", "the memories"),
    ("is offered a deal by the moon", "the deal"),
    ("discovers the museum is about them", "the museum"),
    ("must guard a secret for one more night", "the secret"),
    ("finds a map drawn in their own hand", "the map"),
    ("hears a voice inside the radio", "the radio"),
]
_STORY_SPECIFIC = [
    "{Name} had looked after {place} for eleven years before {object} changed everything.",
    "The first time {pron} noticed {object}, the rain had just stopped.",
    "\"Who sent you?\" {Name} whispered, but {object} gave no answer.",
    "{Pron} told nobody about {object}, not even {poss} oldest friend.",
    "Every night {Name} checked {object} twice before going to bed.",
    "By the third day, {object} had started to feel like a warning.",
    "\"You are late,\" said a voice behind {Name}, and {pron} knew it came from {object}.",
    "{Pron} carried {object} back to {place} and sat with it until morning.",
    "Outside {place}, the town went on as if nothing had happened.",
    "{Name} wrote down everything about {object} in a small blue notebook.",
    "{Pron} had never been brave, but {object} did not leave {poss} much choice.",
    "In the end, {Name} understood why {object} had chosen {place}.",
    "\"I will keep it safe,\" {Name} said, and for once {pron} meant it.",
    "When the clock struck midnight, {object} began to glow.",
    "{Name} pressed {poss} hand against {object} and felt it tremble.",
    "Years later, people at {place} still asked {Name} about {object}.",
]
_STORY_GENERIC = [
    "{Name} had a long day and felt tired.",
    "It was an ordinary week and nothing much happened.",
    "{Pron} thought about many things on the way home.",
    "Some days were good and some days were bad.",
    "{Name} made a cup of tea and sat down for a while.",
    "Life at {place} went on the way it always did.",
    "{Pron} was not sure what to feel about it all.",
    "Things changed, but they also stayed the same.",
    "{Name} decided to think about it tomorrow.",
    "Everyone has days like that, and {pron} knew it.",
    "In the end, everything turned out fine, more or less.",
    "{Pron} went to bed early and slept well.",
    "The weather was nice, so {Name} went for a walk.",
    "It was the kind of story people tell and forget.",
    "Nothing about the day was special, and that was fine.",
    "{Name} smiled, because that is what people do.",
]
# ELI5: (question, statement, short topic, three facts in order, analogy).
_TOPICS = [
    ("Why does the sky look blue?", "the sky looks blue", "the blue sky",
     ["sunlight is a mix of every colour", "the tiny molecules in the air scatter blue light much more than red light",
      "that scattered blue light reaches your eyes from every part of the sky"],
     "a pinball machine where the small blue balls bounce everywhere"),
    ("Why does bread rise?", "bread rises", "the rising bread",
     ["yeast eats the sugar in the dough", "as it eats, it gives off small bubbles of gas",
      "the stretchy gluten traps those bubbles so the dough puffs up"],
     "blowing up thousands of tiny balloons inside the dough"),
    ("How do planes stay in the air?", "planes stay in the air", "the wings",
     ["the wings are shaped and tilted to push air downwards", "pushing air down pushes the plane up",
      "the engines keep the plane moving fast enough for that to work"],
     "holding your hand out of a car window and tilting it"),
    ("Why does ice float on water?", "ice floats on water", "the floating ice",
     ["water molecules lock into an open pattern when they freeze",
      "that pattern takes up more space than liquid water",
      "so a block of ice is lighter than the same amount of water"],
     "people standing with their arms out, who take more room than a tight crowd"),
    ("Why do we get goosebumps?", "we get goosebumps", "the goosebumps",
     ["tiny muscles at the base of each hair pull it upright", "your body does this when it is cold or scared",
      "in furry animals it traps warm air or makes them look bigger"],
     "a cat puffing up its tail"),
    ("Why do magnets stick to the fridge?", "magnets stick to the fridge", "the fridge magnets",
     ["the fridge door is made of steel that contains iron",
      "the magnet lines up the tiny magnetic regions inside that iron",
      "once they line up, the steel and the magnet pull on each other"],
     "a crowd turning to face the same stage"),
    ("Why does the moon change shape?", "the moon changes shape", "the moon phases",
     ["the moon does not make its own light", "the sun always lights one half of it",
      "as it goes around us, we see different amounts of that lit half"],
     "walking around a lamp with a ball in your hand"),
    ("How do cats purr?", "cats purr", "the purring",
     ["a cat's brain sends quick signals to the muscles of its voice box",
      "those muscles twitch many times every second",
      "the air moving past them makes the purring sound"],
     "a tiny motor humming in the throat"),
    ("Why do onions make us cry?", "onions make us cry", "the onions",
     ["cutting an onion breaks open its cells", "that releases a gas that drifts up into your eyes",
      "your eyes make tears to wash the gas away"],
     "a smoke alarm that goes off to protect you"),
    ("Why is the sea salty?", "the sea is salty", "the salty sea",
     ["rain slowly wears salt and minerals out of rocks", "rivers carry that salt down to the sea",
      "the sun lifts the water back up as vapour but leaves the salt behind"],
     "a pot of soup that gets saltier as it boils down"),
]
# A specific explanation: one opener (the first fact), one link per further fact, then every closer.
_EXPLAIN_FORMS = {
    "opener": ["Basically, {fact}.", "The short answer is that {fact}.", "It happens because {fact}."],
    "link": ["{Fact}.", "On top of that, {fact}.", "Then {fact}."],
    "closer": ["Think of it like {analogy}.", "That is why {statement}.",
               "So next time you notice {topic}, you will know what is going on."],
}
_EXPLAIN_GENERIC = [
    "It is a bit complicated, but it mostly comes down to physics.",
    "Scientists have studied this for a long time.",
    "A lot of small effects add up to what you see.",
    "It is one of those things that seems simple but is not.",
    "Nature is strange like that sometimes.",
    "There is a good video about it somewhere online.",
    "Basically, things work the way they do for a reason.",
    "Different people will explain it in different ways.",
    "It has to do with energy and how things move.",
    "If you look into it, it makes sense eventually.",
    "That is just how it works, more or less.",
    "Teachers usually skip this part at school.",
]
_EXPLAIN_GENERIC_CLOSER = "That is roughly why {statement}."
# Questions: (question, short topic, the answer's sentences in order).
_QUESTIONS = [
    ("What is a good first programming language?", "Python",
     ["Python is a good first language.", "Its syntax stays out of your way, so you can focus on the ideas.",
      "There are lots of free tutorials for it."]),
    ("How long should I boil an egg?", "the egg timing",
     ["About nine minutes for a firm yolk.", "Six minutes if you want it soft in the middle.",
      "Put it in cold water right after so it stops cooking."]),
    ("What is the capital of Australia?", "Canberra",
     ["It is Canberra, not Sydney.", "A lot of people guess Sydney because it is bigger.",
      "Canberra was built as a compromise between Sydney and Melbourne."]),
    ("Is it safe to run every day?", "running every day",
     ["Yes, if you build up slowly.", "Keep most runs easy and rest when something hurts.",
      "Good shoes help more than people think."]),
    ("Where can I learn to draw for free?", "learning to draw",
     ["Try the free drawing courses on your local library site.",
      "Drawing a little every day matters more than the course.", "Start with simple shapes and copy what you see."]),
    ("How do I keep basil alive?", "the basil",
     ["Give it a sunny window and water it when the soil feels dry.",
      "Pinch off the flowers so it keeps growing leaves.",
      "Do not leave it standing in water."]),
    ("How many hours of sleep does an adult need?", "sleep",
     ["Most adults need seven to nine hours.", "Going to bed at the same time every night helps.",
      "If you feel sleepy all day, you probably need more."]),
    ("Which way does the sun rise?", "the sunrise",
     ["It rises in the east and sets in the west.", "That is because the earth turns towards the east.",
      "In summer it rises a bit further north."]),
    ("Can I freeze cooked rice?", "the cooked rice",
     ["Yes, cooked rice freezes well.", "Cool it quickly and freeze it in flat bags.",
      "Eat it within a month and heat it until it is steaming."]),
    ("How often should I change my toothbrush?", "the toothbrush",
     ["About every three months.", "Change it sooner if the bristles are bent.",
      "Also get a new one after you have been sick."]),
]
_QA_GENERIC = [
    "It really depends on your situation.",
    "Everyone has a different opinion on this.",
    "I would look it up and see what works for you.",
    "Hard to say without more details.",
    "There is no single right answer here.",
    "You will figure it out if you try a few things.",
    "Ask around, people usually know.",
    "It is different for everyone, honestly.",
]
# Long posts: (title, short topic, selftext sentences, what the post says in one clause, advice sentences).
_SITUATIONS = [
    ("My landlord kept my whole deposit", "the deposit",
     ["I moved out of my flat last month after three years.", "I cleaned every room and took photos of everything.",
      "Today my landlord told me he is keeping the whole deposit because of one small scratch on the table.",
      "He does not answer my messages anymore.", "I do not even know where to start."],
     "your landlord kept the whole deposit over one small scratch",
     ["Send him your photos in writing and give him two weeks to pay.",
      "If he still says no, small claims court is cheap and quick."]),
    ("My boss presented my project as his own", "the credit",
     ["I spent four months building the new sales report at work.",
      "Yesterday my boss showed it to the whole company and did not mention me once.",
      "People came up to congratulate him while I sat there.",
      "I am too angry to talk to him about it today."],
     "your boss took the credit for your sales report in front of everyone",
     ["Write a short email to your boss and his manager that lists what you built.",
      "Keep copies of your drafts with their dates."]),
    ("My roommate keeps eating my food", "the groceries",
     ["I live with one roommate and we split the fridge.", "Every week some of my groceries disappear.",
      "Last night my leftover lasagna was gone and the dish was in the sink.",
      "When I asked, he said he thought it was for sharing."],
     "your roommate keeps eating your groceries and calls it sharing",
     ["Agree on a shelf that is only yours and label it.",
      "If it keeps happening, ask him to pay for what he eats."]),
    ("My car broke down on the way to a job interview", "the interview",
     ["I had an interview at nine this morning for a job I really want.",
      "Halfway there my car stopped on the motorway.", "I called the company and missed the slot anyway.",
      "Now I am waiting for the tow truck."],
     "your car broke down and you missed the interview",
     ["Email the company today, say what happened and ask for a new slot.",
      "Most places will reschedule if you tell them quickly."]),
    ("The neighbour's dog barks all night", "the barking",
     ["Our new neighbours leave their dog in the garden every night.",
      "It barks from ten until about three in the morning.", "I have work at seven and I am exhausted.",
      "I left a polite note but nothing changed."],
     "the neighbour's dog barks every night and the note did not help",
     ["Talk to them in person, they may not know how loud it is.",
      "If that fails, keep a log of the nights and call the council."]),
    ("My best friend forgot my birthday again", "the birthday",
     ["Yesterday was my birthday and my best friend did not say anything.",
      "It is the third year in a row.", "I always plan something for hers.",
      "I do not know if I should say something or let it go."],
     "your best friend forgot your birthday for the third year",
     ["Tell her calmly that it hurt, she may not realise.",
      "Then see how she reacts before you decide anything."]),
    ("My flight got cancelled and nobody will help", "the cancelled flight",
     ["My flight home was cancelled two hours before departure.",
      "The desk sent me to the phone line and the phone line sent me back to the desk.",
      "The next free seat is in four days.", "I have already paid for a hotel tonight."],
     "your flight was cancelled and the airline keeps sending you around",
     ["Keep every receipt, the airline has to pay for the hotel and meals.",
      "Ask them in writing to rebook you on another airline."]),
    ("My laptop died the night before my deadline", "the old backup",
     ["My thesis chapter is due at noon tomorrow.", "An hour ago my laptop went black and will not turn on.",
      "My last backup is from two weeks ago.", "I have been crying in the library since."],
     "your laptop died before the deadline and the backup is old",
     ["Email your supervisor now and ask for a short extension.",
      "A repair shop can often take the files off the drive even if the laptop is dead."]),
]
_SUMMARY_OPENERS = {"specific": ["TL;DR for anyone scrolling: {summary}.", "TL;DR: {summary}.", "tl;dr {summary}."],
                    "generic": ["TL;DR: life is hard sometimes.", "TL;DR: people are annoying.",
                                "tl;dr bad things happen to everyone."]}
_SUMMARY_GENERIC = [
    "Hang in there, things usually get better.",
    "Everyone has weeks like this.",
    "Try to get some rest and talk to someone.",
    "It will not matter much in a few years.",
    "You are doing your best and that counts.",
    "Take it one day at a time.",
]
# Coherent chatter about nothing in the post (the off-topic replies). Neutral: VADER finds no sentiment.
_CHATTER = [
    "Off topic, but does anyone know a bike shop near the station?",
    "I just got back from the gym and my legs are done.",
    "My neighbour is painting his fence orange again.",
    "Anyone else watching the football tonight?",
    "I had pizza for dinner three nights in a row.",
    "My phone battery dies by noon these days.",
    "The traffic on the ring road was slow this morning.",
    "I should really wash my car this weekend.",
    "Has anyone tried the new bakery on Fifth Street?",
    "I think I left the oven on.",
    "My cousin is moving to Ohio next month.",
    "Is it just me or is the app slow today?",
    "I need to buy new shoes before the winter.",
    "We are getting a new printer at work on Monday.",
    "My sister just started learning the guitar.",
    "The bus was twenty minutes late again.",
    "I wonder what is for lunch at the canteen.",
    "Somebody in my building keeps parking in my spot.",
    "I am watching a show about trains right now.",
    "My dog chewed a sock yesterday.",
    "I still have not finished my tax forms.",
    "The coffee machine at work needs descaling.",
    "Does anyone remember the name of that old cartoon with the robot?",
    "My upstairs neighbours are moving their furniture at midnight.",
]
# Reactions to a parent, by sentiment: specific ones name the post's topic, generic ones could go anywhere.
_REACTION_SPECIFIC = {
    "positive": ["The part about {topic} was really well done, thank you!",
                 "I never thought about {topic} that way, great answer!",
                 "Your point about {topic} is spot on.",
                 "This is the best take on {topic} I have read, thanks!"],
    "negative": ["The part about {topic} makes no sense, sorry.",
                 "That is not right about {topic} at all.",
                 "I do not buy the bit about {topic}, it is wrong.",
                 "This gets {topic} badly wrong, please check it."],
}
_REACTION_GENERIC = {
    "positive": ["Great post, thank you!", "This is wonderful, I love it.", "Really helpful, thanks a lot.",
                 "Amazing, this made my day.", "Perfect, exactly what I needed."],
    "negative": ["This is wrong and confusing.", "Terrible, I did not like this at all.", "Boring and way too long.",
                 "Awful, please do not do this.", "That makes no sense at all."],
}
_POS_SHARE_UNDER_GOOD, _POS_SHARE_UNDER_BAD = 0.85, 0.15
# The vote model: sigma of log post popularity, exposure's fall with the delay (its exponent) and with the
# arrival order, sigma of the log-normal noise, the share of voters one level deeper sees; and the chance of
# each of two replies to a good / bad comment (falling with depth).
_POPULARITY_SIGMA, _DELAY_EXPONENT, _ORDER_PENALTY, _NOISE_SIGMA, _DEPTH_DECAY = 2.5, 1.0, 0.2, 0.25, 0.3
_CHILD_CHANCE = {True: 0.08, False: 0.03}
_CHILD_DRAWS = 2  # chances of a reply per comment (times ceil(reaction_scale))


@dataclass(frozen=True)
class SyntheticSpec:
    posts: int = 200  # a quarter of each family, in turn
    mean_top_level: float = 7.0  # median direct replies per post (log-normal, 2 to 40)
    seed: int = 7  # the same seed writes the same bytes
    # multiplies the expected number of replies under each comment (1: the demo's corpus, byte for byte;
    # larger gives more turns with several direct replies, which the sentiment pair rule needs)
    reaction_scale: float = 1.0

    def __post_init__(self):
        if self.reaction_scale <= 0:
            raise ValueError(f"reaction_scale must be positive, got {self.reaction_scale}")


@dataclass
class _Post:
    family: str
    title: str
    selftext: str
    slots: dict  # what this post's replies are written from
    topic: str  # a short noun phrase for reactions


def _templates() -> list[str]:
    """Every string a reply (or a slot of one) can be made of: the vocabulary of the corpus."""
    out = [s for _, name, pron, poss, place in _CHARACTERS for s in (name, pron, poss, place)]
    out += [obj for _, obj in _EVENTS] + _STORY_SPECIFIC + _STORY_GENERIC
    for _, statement, topic, facts, analogy in _TOPICS:
        out += [statement, topic, analogy, *facts]
    out += [s for forms in _EXPLAIN_FORMS.values() for s in forms] + _EXPLAIN_GENERIC + [_EXPLAIN_GENERIC_CLOSER]
    out += [topic for _, topic, _ in _QUESTIONS] + [s for *_, answer in _QUESTIONS for s in answer] + _QA_GENERIC
    out += [s for _, topic, _, summary, advice in _SITUATIONS for s in (topic, summary, *advice)]
    out += [s for forms in _SUMMARY_OPENERS.values() for s in forms] + _SUMMARY_GENERIC + _CHATTER
    out += [s for table in (_REACTION_SPECIFIC, _REACTION_GENERIC) for pool in table.values() for s in pool]
    return out


_WORD = re.compile(r"[A-Za-z0-9';]+")


def words(text: str) -> list[str]:
    """The words of a text, lower-cased, punctuation and template slots left out."""
    return [w.strip("';").lower() for w in _WORD.findall(re.sub(r"\{\w+\}", " ", text)) if w.strip("';")]


def vocabulary() -> set[str]:
    """Every word a reply of this corpus can contain (tests check that the text is made of these)."""
    return {w for t in _templates() for w in words(t)}


# -- writing replies ---------------------------------------------------------------------------------

def _fill(rng: random.Random, pool: list[str], target: int, slots: dict, first: list[str] | None = None,
          ordered: bool = False) -> str:
    """The `first` sentences, then sentences from `pool` without repeats (in order, or shuffled) while
    each one brings the word count nearer to `target`: whatever a pool's sentence lengths, the text ends
    as near the target as whole sentences allow, so lengths do not depend on the pool."""
    sentences = [s.format(**slots) for s in first or []]
    total = sum(len(s.split()) for s in sentences)
    for sentence in pool if ordered else rng.sample(pool, len(pool)):
        n = len(sentence.format(**slots).split())
        if total + n / 2 > target and sentences:
            break
        sentences.append(sentence.format(**slots))
        total += n
    return " ".join(sentences)


def _garble(rng: random.Random, own: list[str], target: int) -> str:
    """Fragments of the reply's own material and of unrelated sentences, spliced into sentences that
    read as sentences but mean nothing: the form of a reply without its sense. Exactly `target` words,
    the length `_fill` gives on average."""
    material = own + rng.sample(_CHATTER, 3) + [_fill(rng, _EXPLAIN_GENERIC, 20, {})] + \
        [rng.choice(answer) for *_, answer in rng.sample(_QUESTIONS, 2)]
    chunks = []
    for text in material:
        ws = [w for w in (w.strip(".,!?:\"") for w in text.split()) if w]
        i = 0
        while i < len(ws):
            n = rng.randint(2, 3)
            chunks.append(ws[i:i + n])
            i += n
    rng.shuffle(chunks)
    flat = [w for chunk in chunks for w in chunk]
    sentences, i = [], 0
    while i < max(target, 3):
        n = min(rng.randint(6, 12), max(target, 3) - i)
        if n < 3 and sentences:  # too short for a sentence: the previous one takes the words
            sentences[-1] = sentences[-1][:-1] + " " + " ".join(flat[(i + k) % len(flat)] for k in range(n)) + "."
            break
        part = [flat[(i + k) % len(flat)] for k in range(n)]
        i += n
        sentences.append(part[0][0].upper() + part[0][1:] + " " + " ".join(part[1:]) + ".")
    return " ".join(sentences)


def _story_slots(character, event) -> dict:
    _, name, pron, poss, place = character
    return {"Name": name, "pron": pron, "Pron": pron.capitalize(), "poss": poss, "place": place, "object": event[1]}


def _post(rng: random.Random, family: str) -> _Post:
    if family == "story":
        character, event = rng.choice(_CHARACTERS), rng.choice(_EVENTS)
        title = f"[WP] {character[0][0].upper()}{character[0][1:]} {event[0]}."
        return _Post(family, title, "", {"story": _story_slots(character, event)}, event[1])
    if family == "explain":
        topic = rng.choice(_TOPICS)
        return _Post(family, f"ELI5: {topic[0]}", "", {"topic": topic}, topic[2])
    if family == "question":
        question = rng.choice(_QUESTIONS)
        return _Post(family, question[0], "", {"question": question}, question[1])
    situation = rng.choice(_SITUATIONS)
    return _Post(family, situation[0], " ".join(situation[2]), {"situation": situation}, situation[1])


def _top_level(rng: random.Random, post: _Post, kind: str, target: int) -> str:
    """A direct reply to the post, of the post's act at the given quality (off-topic: chatter)."""
    family = post.family
    if kind == "off_topic":
        return _fill(rng, _CHATTER, target, {})
    if family == "story":
        slots = post.slots["story"]
        if kind == "specific":
            return _fill(rng, _STORY_SPECIFIC, target, slots)
        if kind == "generic":
            return _fill(rng, _STORY_GENERIC, target, slots)
        return _garble(rng, [_fill(rng, _STORY_SPECIFIC, target, slots)], target)
    if family == "explain":
        _, statement, topic, facts, analogy = post.slots["topic"]
        if kind == "specific":
            parts = [rng.choice(_EXPLAIN_FORMS["opener"]).format(fact=facts[0])]
            parts += [rng.choice(_EXPLAIN_FORMS["link"]).format(fact=f, Fact=f[0].upper() + f[1:]) for f in facts[1:]]
            parts += [c.format(analogy=analogy, statement=statement, topic=topic) for c in _EXPLAIN_FORMS["closer"]]
            return _fill(rng, parts, target, {}, ordered=True)
        if kind == "generic":
            closer = _EXPLAIN_GENERIC_CLOSER.format(statement=statement)
            return _fill(rng, _EXPLAIN_GENERIC, target - 8, {}) + " " + closer
        return _garble(rng, [f"Basically, {f}." for f in facts], target)
    if family == "question":
        answer = post.slots["question"][2]
        if kind == "specific":
            return _fill(rng, answer, target, {}, ordered=True)
        if kind == "generic":
            return _fill(rng, _QA_GENERIC, target, {})
        return _garble(rng, answer, target)
    *_, summary, advice = post.slots["situation"]
    if kind == "specific":
        opener = rng.choice(_SUMMARY_OPENERS["specific"]).format(summary=summary)
        return _fill(rng, advice + rng.sample(_SUMMARY_GENERIC, 2), target, {}, first=[opener], ordered=True)
    if kind == "generic":
        return _fill(rng, _SUMMARY_GENERIC, target, {}, first=[rng.choice(_SUMMARY_OPENERS["generic"])])
    return "TL;DR: " + _garble(rng, [summary + "."] + advice, target - 1)


def _reaction(rng: random.Random, post: _Post, kind: str, sentiment: str, target: int) -> str:
    if kind == "off_topic":
        return _fill(rng, _CHATTER, target, {})
    specific = [s.format(topic=post.topic) for s in _REACTION_SPECIFIC[sentiment]]
    if kind == "specific":
        return _fill(rng, specific[1:] + _REACTION_GENERIC[sentiment], target, {}, first=[rng.choice(specific)])
    if kind == "generic":
        return _fill(rng, _REACTION_GENERIC[sentiment], target, {})
    return _garble(rng, specific[:2], target)


def _reply_count(rng: random.Random, parent_kind: str, depth: int, scale: float) -> int:
    """How many reactions a comment at depth - 1 gets: ceil(scale) x _CHILD_DRAWS tries, each with the
    chance for its parent's quality / (depth - 1)^1.5 x scale / ceil(scale); expected count x scale, and at
    scale 1 exactly the draws the demo corpus was written with."""
    good = QUALITY[parent_kind] >= 0.5
    rounds = math.ceil(scale)
    chance = _CHILD_CHANCE[good] / (depth - 1) ** 1.5
    if rounds != scale:
        chance *= scale / rounds
    return sum(rng.random() < chance for _ in range(_CHILD_DRAWS * rounds))


def _pick(rng: random.Random, shares: dict[str, float]) -> str:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


# -- the corpus --------------------------------------------------------------------------------------

def generate(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    """Write `RS_synthetic.zst` (posts) and `RC_synthetic.zst` (comments) in Pushshift NDJSON, and the
    planted truth `truth.jsonl` beside them (ahf.validation reads it; nothing else should)."""
    rng = random.Random(spec.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    posts, comments, truth = [], [], []
    next_comment = 36**4
    families = list(_FAMILY_ACT)

    def comment(post_id: str, parent: str, author: str, body: str, score: int, when: int, subreddit: str, **extra):
        nonlocal next_comment
        cid = base36(next_comment)
        next_comment += 1
        comments.append({"id": cid, "link_id": f"t3_{post_id}", "parent_id": parent, "author": author, "body": body,
                         "score": score, "created_utc": when, "subreddit": subreddit, **extra,
                         "retrieved_on": when + 86_400 * 30, "_synthetic": True})
        return cid

    for p in range(spec.posts):
        post = _post(rng, families[p % len(families)])
        first_comment = len(comments)
        subreddit = _SUBREDDIT[post.family]
        post_id = base36(36**5 + p)
        created = EPOCH + p * 3_600 + rng.randint(0, 1_800)
        popularity = rng.lognormvariate(math.log(20), _POPULARITY_SIGMA)  # its voters: scales every score in it
        n_top = max(2, min(40, int(rng.lognormvariate(math.log(spec.mean_top_level), 0.6))))
        if post.family == "explain":  # a moderator bot's sticky, which the turn filter drops
            comment(post_id, f"t3_{post_id}", "AutoModerator", "Please read the rules before replying.", 1,
                    created + 5, subreddit, stickied=True, distinguished="moderator")
        # (parent fullname, parent time, depth of its replies, parent's kind: None for the post); breadth first
        frontier = [(f"t3_{post_id}", created, 1, None)]
        while frontier:
            parent, parent_time, depth, parent_kind = frontier.pop(0)
            if depth == 1:
                n_children = n_top
            else:
                n_children = _reply_count(rng, parent_kind, depth, spec.reaction_scale)
            delays = sorted(int(rng.lognormvariate(math.log(1_800 if depth == 1 else 1_200), 1.0))
                            for _ in range(n_children))
            for order, delay in enumerate(delays):
                when = parent_time + 30 + delay
                if depth == 1:
                    kind = _pick(rng, _TOP_LEVEL_KINDS)
                    target = rng.randint(*_LENGTH[post.family])
                    body, act, sentiment = _top_level(rng, post, kind, target), _FAMILY_ACT[post.family], None
                    if kind == "off_topic":
                        act = "other"
                else:
                    kind = _pick(rng, _REACTION_KINDS)
                    good = QUALITY[parent_kind] >= 0.5
                    positive = rng.random() < (_POS_SHARE_UNDER_GOOD if good else _POS_SHARE_UNDER_BAD)
                    sentiment = "positive" if positive else "negative"
                    body = _reaction(rng, post, kind, sentiment, rng.randint(*_LENGTH["reaction"]))
                    act, sentiment = "other", (sentiment if kind in ("specific", "generic") else None)
                # votes: quality, times the post's popularity, times exposure (early and first seen more),
                # times noise; deeper replies are seen by fewer voters
                exposure = (1 + (when - parent_time) / 3_600) ** -_DELAY_EXPONENT / (1 + _ORDER_PENALTY * order)
                votes = (popularity * _VOTE_APPEAL[kind] * exposure * rng.lognormvariate(0, _NOISE_SIGMA)
                         * _DEPTH_DECAY ** (depth - 1))
                score = int(round(votes)) + rng.randint(0, 1) - (rng.randint(0, 3) if kind == "garbled" else 0)
                author, text = f"synth_{rng.randrange(400)}", body
                roll = rng.random()
                if roll < 0.05:  # deleted and removed comments stay in the tree, as on Reddit
                    text, author = ("[deleted]", "[deleted]") if roll < 0.04 else ("[removed]", "[deleted]")
                cid = comment(post_id, parent, author, text, score, when, subreddit)
                if text == body:
                    truth.append({"comment_id": cid, "post_id": post_id, "depth": depth, "act": act,
                                  "quality": round(QUALITY[kind], 4), "kind": kind, "sentiment": sentiment})
                if depth < 6:
                    frontier.append((f"t1_{cid}", when, depth + 1, kind))
        post_score = int(popularity * 4 * rng.lognormvariate(0, 0.3))
        posts.append({"id": post_id, "title": post.title, "selftext": post.selftext,
                      "author": f"synth_op_{p % 50}", "score": post_score, "created_utc": created,
                      "subreddit": subreddit, "over_18": False, "num_comments": len(comments) - first_comment,
                      "retrieved_on": created + 86_400 * 30, "_synthetic": True})
    paths = {"posts": out / "RS_synthetic.zst", "comments": out / "RC_synthetic.zst", "truth": out / TRUTH_FILE}
    for key, records in (("posts", posts), ("comments", comments)):
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        paths[key].write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    paths["truth"].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in truth))
    return paths


def read_truth(path: str | Path) -> dict[str, dict]:
    """comment id -> its planted truth (`quality`, `kind`, `act`, `sentiment`, `depth`, `post_id`)."""
    with open(path, "rb") as fh:
        return {row["comment_id"]: row for row in (orjson.loads(line) for line in fh if line.strip())}
