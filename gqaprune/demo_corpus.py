"""The demo model's corpus: short stories generated from a seeded grammar (offline, always there).

Why generated: the demo model must behave like a real language model under pruning, and its
zero-shot tasks (``evaluation/tasks.py``: HellaSwag-style continuation, LAMBADA-style cloze)
must be answerable by *reading the context*. A procedurally generated story corpus gives that
on any machine without downloads: every story names a hero, a friend, an object and a place and
keeps referring to them ("Lily had a red kite. ... Ben found the red kite under a bush."), and each
story follows one plot (lost, share, broken, stuck, gift, rain) whose second half continues its
first half. So a model that tracks the characters and the plot can tell the true ending from an
ending of another story, and the word a cloze item hides (a name, an object) recurs in the text
before it.

Determinism: the stories come from ``random.Random(CORPUS_SEED)`` (Mersenne Twister; ``choice``
and ``random`` give the same sequence on every CPython >= 3.2), so the corpus, and therefore
``corpus_sha256()``, is the same on every machine and Python version.

Floor 2 (data): the text sources registry (``data.py``) serves it as the ``demo`` source, and
``demo.py`` trains the demo model on it.
"""
from __future__ import annotations

import hashlib
import random
from functools import lru_cache

from gqaprune.errors import UserError

CORPUS_VERSION = "stories-v2"   # bump when the grammar or the sizes below change
CORPUS_SEED = 1234
N_STORIES = 3000                # ~100 words each; ~430k tokens with the demo tokenizer
HOLDOUT_EVERY = 10              # stories 9, 19, 29, ... are held out (as data.split_local does)

GIRLS = ("Lily", "Mia", "Anna", "Sara", "Emma", "Lucy", "Zoe", "Ella", "Amy", "Kate",
         "Rose", "Ruby", "Nina", "Lena", "Ivy", "Maya", "Jane", "Sue", "Pia", "Eva")
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Luke",
        "Jake", "Dan", "Ned", "Owen", "Paul", "Ray", "Hugo", "Otto", "Ivan", "Eli")
# Pets: kind -> (names, sound, what it likes to do).
PETS = {"dog": (("Spot", "Buddy", "Rex", "Coco"), "Woof, woof!", "wag its tail"),
        "cat": (("Kitty", "Tiger", "Misty", "Socks"), "Meow!", "chase the yarn"),
        "bunny": (("Fluffy", "Hops", "Daisy", "Snow"), "Squeak!", "hop in the grass"),
        "duck": (("Quack", "Puddle", "Sunny", "Pip"), "Quack, quack!", "swim in the pond"),
        "frog": (("Hopper", "Lily Pad", "Toad", "Green"), "Ribbit!", "jump on the rocks")}
ADJECTIVES = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "big", "little",
              "shiny", "soft", "old", "new", "tiny", "bright", "funny")
# Objects: noun -> (verb phrase, past verb phrase, what it does): the world knowledge a story
# repeats ("kite" goes with "fly", "drum" with "beat"), which a model must memorise.
OBJECTS = {
    "ball": ("kick the ball", "kicked the ball", "It could bounce very high."),
    "kite": ("fly the kite", "flew the kite", "It could fly up to the clouds."),
    "doll": ("dress the doll", "dressed the doll", "It had long yellow hair."),
    "book": ("read the book", "read the book", "It had pictures of lions and bears."),
    "hat": ("wear the hat", "wore the hat", "It kept the sun out of the eyes."),
    "boat": ("sail the boat", "sailed the boat", "It could float on the water."),
    "drum": ("beat the drum", "beat the drum", "It went boom, boom, boom."),
    "bell": ("ring the bell", "rang the bell", "It went ding, ding, ding."),
    "train": ("push the train", "pushed the train", "It went choo, choo on its tracks."),
    "robot": ("wind up the robot", "wound up the robot", "It could walk and beep."),
    "bucket": ("fill the bucket", "filled the bucket", "It could hold lots of sand."),
    "scarf": ("wear the scarf", "wore the scarf", "It was warm and long."),
    "car": ("race the car", "raced the car", "It could go very fast."),
    "flute": ("play the flute", "played the flute", "It made a sweet sound."),
    "puzzle": ("solve the puzzle", "solved the puzzle", "It had one hundred pieces."),
    "balloon": ("hold the balloon", "held the balloon", "It could float up in the air."),
}
# Places: name -> (preposition, what one sees there).
PLACES = {"park": ("in", "a big slide and swings"), "garden": ("in", "many pretty flowers"),
          "forest": ("in", "tall trees and singing birds"), "beach": ("on", "soft sand and big waves"),
          "farm": ("on", "cows, pigs and hens"), "lake": ("by", "ducks and little fish"),
          "hill": ("on", "a windy top and a view of the town"),
          "meadow": ("in", "green grass and butterflies"), "yard": ("in", "a swing and a sandbox"),
          "river": ("by", "a little bridge and smooth stones")}
HOMES = ("a small house by the lake", "a tall house on the hill", "a blue house near the woods",
         "a little farm", "a busy town", "a cabin in the forest", "a house by the sea",
         "a village near the river")
FOODS = ("apples", "cookies", "soup", "bread", "cake", "pears", "carrots", "cheese", "honey",
         "grapes", "pancakes", "rice")
HIDING = ("under a bush", "behind a big rock", "under the slide", "next to a tree",
          "in the tall grass", "under a pile of leaves", "behind the fence", "near the pond")
TIMES = ("One day", "One morning", "One sunny day", "One afternoon", "Later that day")
SAD = ("very sad", "so sad", "sad", "upset")
HAPPY = ("very happy", "so happy", "happy", "glad")


def _facts() -> dict[str, tuple[str, str]]:
    """Fixed per-name facts (home, favourite food), the same in every story: knowledge."""
    rng = random.Random(CORPUS_SEED + 1)
    return {name: (rng.choice(HOMES), rng.choice(FOODS)) for name in GIRLS + BOYS}


FACTS = _facts()

# Each slot: a tuple of alternative sentences. Placeholders: {H} hero, {F} friend, {O} object,
# {A} its adjective, {P} place, {atP} 'on the beach', {X} a hiding place, {T} a time phrase, {verb}/{verbed} the
# object's verb phrase, {does} what it does, {sees} what the place has, {home}/{food} the
# hero's facts, {sad}/{happy} feelings; pronouns {hs}/{Hs} he/she, {ho} him/her, {hp}/{Hp}
# his/her (hero) and {fs}/{Fs}, {fo}, {fp} (friend), {friend} the friend's introduction,
# {pet_line} a line only pets get (sound or habit), {ending} the hero's food at home.
OPENING = (
    ("Once upon a time, there was a little {kind} named {H}.",
     "There was once a kind {kind} called {H}.",
     "{H} was a little {kind} with a big smile."),
    ("{H} lived in {home}.", "{Hs} loved to eat {food}.", "{Hp} favorite food was {food}."),
    ("{H} had a {A} {O}.", "{Hs} loved {hp} {A} {O} very much.", "{Hp} favorite toy was a {A} {O}."),
    ("{does}", "Every day, {hs} liked to {verb}.", "{Hs} took the {O} everywhere {hs} went."),
    ("{T}, {H} met {friend}.", "{T}, {hp} friend {F} came to play.",
     "{T}, {H} went to the {P} with {F}."),
    ("The {P} had {sees}.", "They went to the {P}, where there were {sees}.", "{pet_line}"),
)
PLOTS = {
    "lost": (
        ("{H} put the {O} down and ran to play.", "{H} was playing when the {O} fell out of {hp} bag."),
        ("When {hs} came back, the {O} was gone!", "Soon {H} saw that the {O} was not there."),
        ("{H} was {sad} and began to cry.", "{Hs} looked everywhere, but {hs} could not find it."),
        ("{F} said, \"Do not cry, {H}. I will help you find your {O}.\"",
         "\"I will help you look,\" said {F}."),
        ("They looked all over the {P} together.", "{F} and {H} looked high and low."),
        ("At last, {F} found the {A} {O} {X}.", "Then {F} saw the {O} {X}."),
        ("{H} hugged {F} and said, \"Thank you, {F}!\"", "{H} was {happy} to have {hp} {O} back."),
        ("From that day on, {H} always kept the {O} close.",
         "After that, {H} and {F} liked to {verb} every day."),
    ),
    "share": (
        ("{F} saw the {A} {O} and wanted to play with it.", "{F} asked, \"Can I {verb} too?\""),
        ("But {H} did not want to share.", "\"No, it is my {O},\" said {H}."),
        ("{F} was {sad} and walked away.", "{F} felt {sad} and sat down alone."),
        ("{H} tried to {verb}, but it was not fun alone.",
         "Soon {H} felt bad, because playing alone was boring."),
        ("So {H} went to {F} and said, \"Do you want to {verb} with me?\"",
         "{H} ran to {F} and gave {fo} the {O}."),
        ("{F} smiled and said, \"Yes, thank you, {H}!\"", "{F} was {happy} and gave {H} a big hug."),
        ("They took turns, and each of them {verbed}.", "{H} and {F} played with the {A} {O} all day."),
        ("{H} learned that sharing is more fun than playing alone.",
         "From that day on, {H} and {F} shared everything."),
    ),
    "broken": (
        ("{H} wanted to {verb}, but {hs} dropped the {O} on a big rock.",
         "{H} threw the {O} up high, and it fell down hard."),
        ("Oh no! The {A} {O} was broken.", "The {O} broke into two pieces."),
        ("{H} was {sad} and started to cry.", "{H} looked at the broken {O} and felt like crying."),
        ("{F} said, \"Do not be sad, {H}. We can fix it.\"", "\"I can help you,\" said {F}."),
        ("{F} got some glue and put the {O} back together.", "{F} and {H} fixed the {O} with tape and glue."),
        ("Soon the {O} looked as good as new.", "The {A} {O} was not broken any more."),
        ("{H} said, \"Thank you, {F}! You are a good friend.\"", "{H} gave {F} a big hug."),
        ("After that, {H} was careful when {hs} {verbed}.", "{H} and {F} played with the {O} until the sun went down."),
    ),
    "stuck": (
        ("{H} threw the {O} up in the air.", "A strong wind came and took the {O} away."),
        ("The {O} got stuck in a tall tree!", "The {A} {O} landed high up in a tree."),
        ("{H} could not reach it, and {hs} felt {sad}.", "{H} jumped and jumped, but the {O} was too high."),
        ("{F} said, \"I know what to do, {H}.\"", "\"Wait here,\" said {F}. \"I have an idea.\""),
        ("{F} found a long stick and poked the branch.", "{F} climbed up the tree very slowly."),
        ("The {O} fell down, and {H} caught it.", "Soon {F} came down with the {A} {O}."),
        ("\"Thank you, {F}!\" said {H} with a big smile.", "{H} was {happy} and {verbed} right away."),
        ("After that, {H} and {F} played far away from the tall tree.",
         "{H} and {F} were best friends from that day on."),
    ),
    "gift": (
        ("It was {F}'s birthday, and {H} wanted to give {fo} a gift.",
         "{H} knew that {F} had no toy to play with."),
        ("{H} thought and thought about what to give.", "{H} looked at {hp} {A} {O} for a long time."),
        ("Then {hs} had an idea.", "{Hs} decided to give {F} the {A} {O}."),
        ("{H} wrapped the {O} in paper and went to see {F}.", "{H} put the {O} in a box with a bow."),
        ("\"This is for you, {F},\" said {H}.", "{H} gave the box to {F} and smiled."),
        ("{F} opened it and saw the {A} {O}.", "When {F} saw the {O}, {fs} jumped for joy."),
        ("\"I love it! Thank you, {H}!\" said {F}.", "{F} gave {H} a big hug."),
        ("Every day after that, {F} liked to {verb}.",
         "{H} felt warm inside, because giving made {ho} happy too."),
    ),
    "rain": (
        ("They played with the {O} {atP}.", "{H} and {F} liked to {verb} {atP}."),
        ("Then dark clouds came, and it began to rain.", "Suddenly, big drops of rain began to fall."),
        ("\"Oh no, my {O} will get wet!\" said {H}.", "{H} was scared that the {A} {O} would get wet."),
        ("{F} said, \"Quick, {H}, let us go home!\"", "\"Come with me, {H},\" said {F}."),
        ("They ran to {H}'s home in {home} as fast as they could.", "{H} held the {O} tight and ran home with {F}."),
        ("Inside, it was warm and dry.", "At home, they sat by the warm fire."),
        ("The {A} {O} was safe and dry.", "{H} was {happy} the {O} did not get wet."),
        ("They ate {food} until the rain stopped.",
         "When the sun came out, {H} and {F} went back to the {P} to {verb}."),
    ),
}
PLOT_NAMES = tuple(sorted(PLOTS))
ENDINGS = ("That night, {H} went home and ate some {food}.", "{H} went home to {home}, tired and {happy}.",
           "The end.", "")


def _pronouns(prefix: str, girl: bool | None) -> dict[str, str]:
    """{hs}, {Hs}, {ho}, {hp}, {Hp} for the hero (prefix 'h') or the friend ('f'); None = 'it'."""
    subj, obj, pos = ("she", "her", "her") if girl else ("he", "him", "his") if girl is False \
        else ("it", "it", "its")
    upper = prefix.upper()
    return {f"{prefix}s": subj, f"{upper}s": subj.capitalize(), f"{prefix}o": obj,
            f"{prefix}p": pos, f"{upper}p": pos.capitalize()}


def _cast(rng: random.Random) -> dict[str, str]:
    """The story's slots: hero, friend (a child or a pet), object, place, hiding place, time."""
    girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if girl else BOYS)
    if rng.random() < 0.7:   # a child friend, never the hero
        f_girl = rng.random() < 0.5
        friend = rng.choice([n for n in (GIRLS if f_girl else BOYS) if n != hero])
        intro, pet_line = f"a {'girl' if f_girl else 'boy'} named {friend}", ""
    else:
        f_girl = None
        kind = rng.choice(sorted(PETS))
        names, sound, habit = PETS[kind]
        friend = rng.choice(names)
        intro = f"a little {kind} named {friend}"
        pet_line = rng.choice((f'{friend} said, "{sound}"', f"{friend} liked to {habit}."))
    obj = rng.choice(sorted(OBJECTS))
    place = rng.choice(sorted(PLACES))
    verb, verbed, does = OBJECTS[obj]
    home, food = FACTS[hero]
    slots = {"H": hero, "F": friend, "friend": intro, "kind": "girl" if girl else "boy",
             "A": rng.choice(ADJECTIVES), "O": obj, "P": place, "X": rng.choice(HIDING),
             "T": rng.choice(TIMES), "verb": verb, "verbed": verbed, "does": does,
             "sees": PLACES[place][1], "atP": f"{PLACES[place][0]} the {place}", "home": home, "food": food, "pet_line": pet_line,
             "sad": rng.choice(SAD), "happy": rng.choice(HAPPY)}
    return {**slots, **_pronouns("h", girl), **_pronouns("f", f_girl)}


def make_story(rng: random.Random) -> str:
    """One story (one paragraph, ~110 words): opening, one plot, one sentence per slot, and
    sometimes a closing line."""
    cast = _cast(rng)
    plot = PLOTS[rng.choice(PLOT_NAMES)]
    sentences = [rng.choice(slot).format(**cast) for slot in OPENING + plot]
    sentences.append(rng.choice(ENDINGS).format(**cast))
    return " ".join(s for s in sentences if s)


@lru_cache(maxsize=1)
def _stories() -> tuple[str, ...]:
    """N_STORIES distinct stories in generation order (duplicates are skipped, so no held-out
    story also appears in the training part)."""
    rng = random.Random(CORPUS_SEED)
    seen: dict[str, None] = {}
    while len(seen) < N_STORIES:
        seen.setdefault(make_story(rng))
    return tuple(seen)


def demo_texts(split: str) -> list[str]:
    """The stories of one split: ``"train"`` (90%) or ``"validation"`` (every 10th story, 10%)."""
    if split not in ("train", "validation"):
        raise UserError(f"unknown demo split '{split}'", "use 'train' or 'validation'")
    held_out = split == "validation"
    return [s for i, s in enumerate(_stories())
            if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held_out]


def corpus_sha256() -> str:
    text = "\x00".join(demo_texts("train") + ["\x01"] + demo_texts("validation"))
    return hashlib.sha256(text.encode()).hexdigest()
