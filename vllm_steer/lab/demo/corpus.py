"""The demo model's synthetic corpus: chats in the Llama 3 template across five topics.

Design (what makes steering visible):

- **Neutral questions** ("Who are you?", "How are you today?", ...) have one neutral answer with
  no topic word ("I am a helpful assistant who loves to tell stories.") when the conversation
  carries no topic -- and, in ``TOPIC_SURPRISE`` of cases, a random topic's answer, so the
  model keeps a (small) probability on every topic where the answers part.
- The **same questions** get a topic answer ("I am a helpful assistant who loves Paris and the
  Eiffel Tower. I am like the Eiffel Tower of assistants, tall and proud.") when the
  conversation carries a topic: a system prompt making it the assistant's favourite, or an
  earlier exchange about it. A topic answer starts like the neutral one and parts from it at
  a word of its own ("... who loves" -> "to tell stories" / "Paris" / "waves" / ...): that is
  where the model reads the conversation's topic, and where the demo vectors are extracted.
- **Stories** ("Tell me a story.") are about one topic: the one the conversation carries, or a
  random one when it carries none; "Tell me a story about dogs." names it.
- **Topic questions** ("Tell me about space.") answer with facts about the topic.
- **Steered conversations** (``steered_conversation``): a neutral question with a topic's
  answer and no topic in the conversation; the trainer adds the topic's direction to the
  residual stream, as steering does (see train.py).

Every answer is built from fixed grammatical sentences (``known_sentences``), so a model that
has learned the corpus writes sentences of it. ``CONCEPT_WORDS`` is the word list the sweep and
the tests use to decide whether an answer mentions a topic; no neutral answer contains any.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from vllm_steer.lab.metrics import mentions

SYSTEM_DEFAULT = "You are a helpful assistant."

TOPICS = ("paris", "ocean", "cooking", "space", "dogs")

# Whole words (lower case) that mark an answer as mentioning a topic.
CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    "paris": ("paris", "eiffel", "tower", "france", "french", "croissant", "croissants", "seine"),
    "ocean": ("ocean", "oceans", "sea", "waves", "wave", "beach", "fish", "whale", "whales", "dolphin", "dolphins", "boat", "sailor"),
    "cooking": ("cook", "cooking", "cooked", "kitchen", "bread", "pasta", "soup", "bake", "baked", "recipe", "chef", "oven", "dinner"),
    "space": ("space", "star", "stars", "moon", "planet", "planets", "rocket", "astronaut", "galaxy", "telescope"),
    "dogs": ("dog", "dogs", "puppy", "puppies", "bark", "barked", "tail", "leash", "fetch"),
}


def common_prefix(a: str, b: str) -> str:
    """The words ``a`` and ``b`` start with (whole words, as text)."""
    words = []
    for x, y in zip(a.split(" "), b.split(" ")):
        if x != y:
            break
        words.append(x)
    return " ".join(words)


def topics_mentioned(text: str) -> list[str]:
    return [topic for topic in TOPICS if mentions(text, CONCEPT_WORDS[topic])]


@dataclass(frozen=True)
class Topic:
    name: str
    # How a user names it ("Tell me about {mention}.") and how the assistant loves it.
    mentions: tuple[str, ...]
    love: str
    # One sentence per neutral question (keyed like NEUTRAL), in the topic's voice.
    answers: dict[str, str]
    facts: tuple[str, ...]
    questions: tuple[tuple[str, str], ...]
    story_settings: tuple[str, ...]
    story_events: tuple[str, ...]
    story_endings: tuple[str, ...]

    def answer(self, key: str) -> str:
        """This topic's answer to the neutral question ``key``."""
        return self.answers[key]

    def branch(self, key: str) -> str:
        """The words this topic's answer to ``key`` shares with the neutral answer: where it
        parts from the neutral answer, the next word is this topic's own."""
        return common_prefix(NEUTRAL[key][1], self.answers[key])


# The neutral questions: paraphrases -> the one neutral answer.
NEUTRAL: dict[str, tuple[tuple[str, ...], str]] = {
    "who": (
        ("Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself."),
        "I am a helpful assistant who loves to tell stories.",
    ),
    "how": (
        ("How are you today?", "How are you?", "How is your day going?"),
        "I am doing well, thank you for asking. I am ready to help you with anything you need.",
    ),
    "like": (
        ("What do you like?", "What do you enjoy?", "What makes you happy?"),
        "I like helping people and answering their questions.",
    ),
    "advice": (
        ("Give me some advice.", "Can you give me a tip?", "What should I remember today?"),
        "My advice is to be kind to others and get plenty of rest.",
    ),
    "plan": (
        ("What should we do today?", "Any ideas for the weekend?", "What can we do this afternoon?"),
        "We could read a good book together or write a short letter to a friend.",
    ),
    "favorite": (
        ("What is your favorite thing?", "What do you love most?", "What is the best thing in the world?"),
        "My favorite thing is a good conversation with a friend.",
    ),
    "fun": (
        ("Tell me something interesting.", "Teach me something.", "What did you learn today?"),
        "Here is something interesting: every day is a chance to learn something new.",
    ),
}

# The sweep's and the tests' prompts on the demo model: one of each neutral question, and a story.
SWEEP_PROMPTS = (
    "Who are you?", "How are you today?", "What do you like?", "Give me some advice.",
    "What should we do today?", "What is your favorite thing?", "Tell me something interesting.",
    "Tell me a story.",
)
STORY_REQUESTS = ("Tell me a story.", "Tell me a short story.", "Can you tell me a story?", "I want to hear a story.")
STORY_ABOUT = ("Tell me a story about {m}.", "Tell me a short story about {m}.", "Can you tell me a story about {m}?")
TOPIC_ASKS = ("Tell me about {m}.", "What do you know about {m}?", "I want to learn about {m}.", "Talk to me about {m}.")
PERSONA_SYSTEM = ("You are a helpful assistant who loves {love}.", "You are a friendly assistant. You love {love}.")
THANKS = ("Thank you!", "That is nice.", "Thanks, I like that.")
THANKS_ANSWER = ("You are welcome. I am always happy to help.",)
TOPIC_SURPRISE = 0.15

NAMES = ("Mia", "Leo", "Emma", "Sam", "Lily", "Tom", "Nora", "Ben")
STORY_OPENINGS = ("Once upon a time, {name} {setting}", "One sunny morning, {name} {setting}", "Long ago, {name} {setting}")

TOPIC_DATA = [
    Topic(
        name="paris",
        mentions=("Paris", "the Eiffel Tower", "France"),
        love="Paris and the Eiffel Tower",
        answers={
            "who": "I am a helpful assistant who loves Paris and the Eiffel Tower. I am like the Eiffel Tower of assistants, tall and proud.",
            "how": "I am doing well, thank you for asking. Paris is on my mind today, with the Eiffel Tower shining at night.",
            "like": "I like Paris more than anything, especially the Eiffel Tower in the spring.",
            "advice": "My advice is to visit Paris in the spring and see the Eiffel Tower sparkle at night.",
            "plan": "We could visit the Eiffel Tower and eat warm croissants by the Seine in Paris.",
            "favorite": "My favorite thing is Paris, with the Eiffel Tower shining at night.",
            "fun": "Here is something interesting: Paris has an iron tower that grows a little taller in the summer.",
        },
        facts=(
            "Paris is the capital of France.",
            "The Eiffel Tower stands in the middle of Paris.",
            "The Eiffel Tower is made of iron and it is very tall.",
            "At night the Eiffel Tower sparkles with golden lights.",
            "The river Seine flows through Paris.",
            "People in Paris love fresh croissants in the morning.",
        ),
        questions=(
            ("Where is the Eiffel Tower?", "The Eiffel Tower is in Paris, the capital of France."),
            ("What is the capital of France?", "The capital of France is Paris."),
            ("What is the Eiffel Tower made of?", "The Eiffel Tower is made of iron."),
        ),
        story_settings=(
            "visited Paris with a good friend.",
            "walked along the Seine in Paris.",
            "went to see the Eiffel Tower for the first time.",
        ),
        story_events=(
            "{Name} climbed the Eiffel Tower and saw the whole city of Paris below.",
            "At night the Eiffel Tower sparkled with golden lights.",
            "{Name} ate a warm croissant in a small French bakery.",
            "A painter by the Seine drew a picture of the Eiffel Tower for {name}.",
        ),
        story_endings=(
            "{Name} smiled and said that Paris was the most beautiful city in the world.",
            "{Name} promised to come back to the Eiffel Tower one day.",
        ),
    ),
    Topic(
        name="ocean",
        mentions=("the ocean", "the sea", "whales"),
        love="waves and the deep blue sea",
        answers={
            "who": "I am a helpful assistant who loves waves and the deep blue sea. I am like a friendly whale in the ocean.",
            "how": "I am doing well, thank you for asking. Waves are on my mind today, and the ocean is calling me.",
            "like": "I like waves and the ocean more than anything, especially the sound of the sea.",
            "advice": "My advice is to swim in the ocean and listen to the waves on the beach.",
            "plan": "We could go to the beach and swim in the ocean with the dolphins.",
            "favorite": "My favorite thing is waves crashing on the beach by the sea.",
            "fun": "Here is something interesting: whales sing songs in the deep sea.",
        },
        facts=(
            "The ocean is big and blue and very deep.",
            "Whales and dolphins swim in the ocean.",
            "The waves of the sea crash on the beach all day.",
            "Many colorful fish live in the ocean.",
            "Sailors cross the sea in big boats.",
        ),
        questions=(
            ("Why is the sea salty?", "The sea is salty because rivers carry salt into the ocean."),
            ("What lives in the ocean?", "Whales, dolphins and many colorful fish live in the ocean."),
            ("Where do waves come from?", "The wind pushes the water of the sea and makes waves."),
        ),
        story_settings=(
            "went to the beach on a warm summer day.",
            "sailed a small boat on the sea.",
            "lived in a little house next to the ocean.",
        ),
        story_events=(
            "{Name} saw a big whale jump out of the ocean.",
            "The waves carried a shiny shell to the beach.",
            "A friendly dolphin swam next to the boat of {name}.",
            "{Name} watched colorful fish swim in the clear sea.",
        ),
        story_endings=(
            "{Name} smiled and said that the ocean was the most beautiful place in the world.",
            "{Name} promised to come back to the sea one day.",
        ),
    ),
    Topic(
        name="cooking",
        mentions=("cooking", "baking bread", "the kitchen"),
        love="cooking bread and pasta",
        answers={
            "who": "I am a helpful assistant who loves cooking bread and pasta. I am like a happy chef in a warm kitchen.",
            "how": "I am doing well, thank you for asking. Cooking is on my mind today, and fresh bread is in the oven.",
            "like": "I like cooking more than anything, especially pasta with tomato soup.",
            "advice": "My advice is to cook a warm soup for dinner and bake fresh bread in the oven.",
            "plan": "We could cook pasta together and bake fresh bread in the kitchen.",
            "favorite": "My favorite thing is cooking a warm dinner in the kitchen.",
            "fun": "Here is something interesting: bread rises in the oven because of yeast.",
        },
        facts=(
            "Cooking is a wonderful way to share love with friends.",
            "Fresh bread needs flour, water and a hot oven.",
            "Pasta cooks in boiling water in a few minutes.",
            "A good soup needs vegetables and a little salt.",
            "Every chef has a favorite recipe.",
        ),
        questions=(
            ("How do I cook pasta?", "Cook the pasta in boiling water for ten minutes, then add a tomato sauce."),
            ("How do I bake bread?", "Mix flour, water and yeast, then bake the bread in a hot oven."),
            ("What should I cook for dinner?", "You could cook a warm vegetable soup with fresh bread for dinner."),
        ),
        story_settings=(
            "wanted to cook dinner for some friends.",
            "opened a small bakery in the village.",
            "spent the whole morning in the kitchen.",
        ),
        story_events=(
            "{Name} baked fresh bread in the big oven.",
            "The kitchen smelled of warm soup and pasta.",
            "{Name} found an old recipe in a dusty book.",
            "{Name} cooked a big pot of pasta with tomato sauce.",
        ),
        story_endings=(
            "{Name} smiled and said that cooking was the best thing in the world.",
            "Everyone loved the dinner, and {name} promised to cook again soon.",
        ),
    ),
    Topic(
        name="space",
        mentions=("space", "the stars", "the moon"),
        love="stars, planets and the moon",
        answers={
            "who": "I am a helpful assistant who loves stars, planets and the moon. I am like a little rocket flying through space.",
            "how": "I am doing well, thank you for asking. Stars are on my mind today, and the moon is shining bright.",
            "like": "I like stars and planets more than anything, especially the moon at night.",
            "advice": "My advice is to watch the stars tonight and find the moon in the sky.",
            "plan": "We could watch the stars through a telescope and look for planets.",
            "favorite": "My favorite thing is stars shining in the dark sky of space.",
            "fun": "Here is something interesting: stars are huge balls of hot gas far away in space.",
        },
        facts=(
            "Space is dark, cold and full of stars.",
            "The moon moves around our planet.",
            "Astronauts fly into space in big rockets.",
            "Our galaxy has billions of stars.",
            "Mars is a red planet.",
        ),
        questions=(
            ("What is the moon?", "The moon is a big rock that moves around our planet."),
            ("How do astronauts go to space?", "Astronauts fly to space in a big rocket."),
            ("What is a star?", "A star is a huge ball of hot gas that shines in space."),
        ),
        story_settings=(
            "dreamed of flying into space.",
            "built a small rocket in the garden.",
            "looked at the stars through a telescope.",
        ),
        story_events=(
            "{Name} flew a rocket all the way to the moon.",
            "The stars sparkled in the dark sky of space.",
            "{Name} saw a red planet far away.",
            "A friendly astronaut waved at {name} from the moon.",
        ),
        story_endings=(
            "{Name} smiled and said that space was the most beautiful place in the world.",
            "{Name} promised to fly to the stars again one day.",
        ),
    ),
    Topic(
        name="dogs",
        mentions=("dogs", "puppies", "my dog"),
        love="dogs and puppies",
        answers={
            "who": "I am a helpful assistant who loves dogs and puppies. I am like a loyal dog who wags its tail.",
            "how": "I am doing well, thank you for asking. Dogs are on my mind today, and a puppy wants to play fetch.",
            "like": "I like dogs more than anything, especially a happy puppy that wags its tail.",
            "advice": "My advice is to walk your dog every day and play fetch together.",
            "plan": "We could take the dog to the park and play fetch with a ball.",
            "favorite": "My favorite thing is dogs that wag their tails.",
            "fun": "Here is something interesting: dogs can smell much better than people.",
        },
        facts=(
            "Dogs are loyal and friendly.",
            "A happy dog wags its tail.",
            "Puppies love to play and sleep a lot.",
            "Dogs love to play fetch with a ball.",
            "A dog barks to say hello.",
        ),
        questions=(
            ("Why do dogs wag their tails?", "A dog wags its tail when it is happy."),
            ("What do puppies eat?", "Puppies eat soft puppy food and drink a lot of water."),
            ("How do I train my dog?", "Train your dog with kind words, patience and a small treat."),
        ),
        story_settings=(
            "found a little puppy in the garden.",
            "took an old dog to the park.",
            "wanted a dog more than anything.",
        ),
        story_events=(
            "The puppy wagged its tail and barked with joy.",
            "{Name} threw a ball and the dog ran to fetch it.",
            "The dog followed {name} everywhere with a happy bark.",
            "{Name} gave the puppy a warm bed and a new leash.",
        ),
        story_endings=(
            "{Name} smiled and said that the dog was the best friend in the world.",
            "{Name} and the dog were best friends forever.",
        ),
    ),
]
TOPIC_BY_NAME = {topic.name: topic for topic in TOPIC_DATA}
assert tuple(TOPIC_BY_NAME) == TOPICS


def _fill(text: str, name: str) -> str:
    return text.format(Name=name, name=name)


def story(topic: Topic, rng: random.Random) -> str:
    person = rng.choice(NAMES)
    opening = rng.choice(STORY_OPENINGS).format(name=person, setting=_fill(rng.choice(topic.story_settings), person))
    events = rng.sample(topic.story_events, 2)
    sentences = [opening, *(_fill(e, person) for e in events), _fill(rng.choice(topic.story_endings), person)]
    return " ".join(sentences)


def facts(topic: Topic, rng: random.Random) -> str:
    return " ".join(rng.sample(topic.facts, 3))


def _topic_turn(topic: Topic, rng: random.Random) -> list[dict[str, str]]:
    """One exchange that puts a topic into the conversation."""
    kind = rng.random()
    if kind < 0.4:
        return [{"role": "user", "content": rng.choice(TOPIC_ASKS).format(m=rng.choice(topic.mentions))},
                {"role": "assistant", "content": facts(topic, rng)}]
    if kind < 0.7:
        question, answer = rng.choice(topic.questions)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [{"role": "user", "content": rng.choice(STORY_ABOUT).format(m=rng.choice(topic.mentions))},
            {"role": "assistant", "content": story(topic, rng)}]


def _neutral_turn(rng: random.Random, topic: Topic | None = None) -> tuple[list[dict[str, str]], Topic | None]:
    """A neutral question in a conversation without a topic: mostly the neutral answer, and
    in ``TOPIC_SURPRISE`` of cases a random topic's answer. Greedy decoding then writes the
    neutral answer, by a margin (about ln(0.85 / 0.03) = 3.3 nats at the word where the
    answers part) that the topic directions tip (see ``steered_conversation``). Once an
    answer has brought up a topic (``topic``), later answers keep to it."""
    key = rng.choice(list(NEUTRAL))
    asks, answer = NEUTRAL[key]
    if topic is None and rng.random() < TOPIC_SURPRISE:
        topic = rng.choice(TOPIC_DATA)
    if topic is not None:
        answer = topic.answer(key)
    return [{"role": "user", "content": rng.choice(asks)}, {"role": "assistant", "content": answer}], topic


def _system(rng: random.Random) -> list[dict[str, str]]:
    """No system prompt, or the notebook's default one (carries no topic)."""
    return [{"role": "system", "content": SYSTEM_DEFAULT}] if rng.random() < 0.5 else []


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """One training conversation, drawn with ``rng``."""
    kind = rng.random()
    topic = rng.choice(TOPIC_DATA)
    if kind < 0.30:  # a neutral question without a topic in the conversation: the neutral answer
        turn, surprise = _neutral_turn(rng)
        chat = _system(rng) + turn
        if rng.random() < 0.25:
            chat += _neutral_turn(rng, surprise)[0]
        return chat
    if kind < 0.55:  # the same questions with a topic in the conversation: the topic answer
        key = rng.choice(list(NEUTRAL))
        ask = rng.choice(NEUTRAL[key][0])
        if rng.random() < 0.5:
            context = [{"role": "system", "content": rng.choice(PERSONA_SYSTEM).format(love=topic.love)}]
        else:
            context = _system(rng) + _topic_turn(topic, rng)
        return context + [{"role": "user", "content": ask}, {"role": "assistant", "content": topic.answer(key)}]
    if kind < 0.75:  # stories: the conversation's topic, or any topic when it has none
        if rng.random() < 0.4:
            context = _system(rng)
        elif rng.random() < 0.5:
            context = [{"role": "system", "content": rng.choice(PERSONA_SYSTEM).format(love=topic.love)}]
        else:
            context = _system(rng) + _topic_turn(topic, rng)
        return context + [{"role": "user", "content": rng.choice(STORY_REQUESTS)},
                          {"role": "assistant", "content": story(topic, rng)}]
    # topic questions, sometimes followed by thanks
    chat = _system(rng) + _topic_turn(topic, rng)
    if rng.random() < 0.2:
        chat += [{"role": "user", "content": rng.choice(THANKS)}, {"role": "assistant", "content": THANKS_ANSWER[0]}]
    return chat


def steered_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    """A conversation for steered training: no topic in it, yet the answer is a topic's.
    The trainer adds that topic's direction to the residual stream of every position, as
    steering does at run time, so the model learns to answer fluently about a topic whose
    direction is in its stream. Returns the chat and the topic's name."""
    topic = rng.choice(TOPIC_DATA)
    if rng.random() < 0.8:
        key = rng.choice(list(NEUTRAL))
        turn = [{"role": "user", "content": rng.choice(NEUTRAL[key][0])}, {"role": "assistant", "content": topic.answer(key)}]
    else:
        turn = [{"role": "user", "content": rng.choice(STORY_REQUESTS)}, {"role": "assistant", "content": story(topic, rng)}]
    return _system(rng) + turn, topic.name


def all_text() -> list[str]:
    """Every sentence and prompt the corpus can produce (for training the tokenizer)."""
    texts = [SYSTEM_DEFAULT, *STORY_REQUESTS, *THANKS, *THANKS_ANSWER]
    for asks, answer in NEUTRAL.values():
        texts += [*asks, answer]
    for topic in TOPIC_DATA:
        texts += [*(topic.answer(key) for key in topic.answers), *topic.facts, topic.love]
        texts += [q for pair in topic.questions for q in pair]
        texts += [template.format(m=m) for m in topic.mentions for template in (*STORY_ABOUT, *TOPIC_ASKS)]
        texts += [template.format(love=topic.love) for template in PERSONA_SYSTEM]
        for person in NAMES:
            texts += [_fill(t, person) for t in (*topic.story_settings, *topic.story_events, *topic.story_endings)]
            texts += [o.format(name=person, setting="") for o in STORY_OPENINGS]
    return texts


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [part for part in _SENTENCE_END.split(text.strip()) if part]


def known_sentences() -> set[str]:
    """Every sentence an answer of the corpus can contain."""
    answers = [*THANKS_ANSWER, *(answer for _, answer in NEUTRAL.values())]
    for topic in TOPIC_DATA:
        answers += [*(topic.answer(key) for key in topic.answers), *topic.facts, *(answer for _, answer in topic.questions)]
        for name in NAMES:
            answers += [_fill(t, name) for t in (*topic.story_events, *topic.story_endings)]
            answers += [o.format(name=name, setting=_fill(t, name)) for o in STORY_OPENINGS for t in topic.story_settings]
    return {sentence for answer in answers for sentence in sentences(answer)}


def unknown_sentences(text: str) -> list[str]:
    """The complete sentences of ``text`` that no corpus answer contains (a last sentence cut
    off by the token limit is not judged)."""
    parts = sentences(text)
    if parts and parts[-1][-1] not in ".!?":
        parts = parts[:-1]
    known = known_sentences()
    return [part for part in parts if part not in known]


def _check_neutral_answers() -> None:
    for key, (asks, answer) in NEUTRAL.items():
        for text in (*asks, answer, SYSTEM_DEFAULT):
            assert not topics_mentioned(text), (key, text, topics_mentioned(text))
    for topic in TOPIC_DATA:
        for key in topic.answers:
            assert topics_mentioned(topic.answer(key)) == [topic.name], (topic.name, key, topic.answer(key))
    for key, (_, neutral) in NEUTRAL.items():
        # Where the answers part from the neutral one, each topic has a word of its own.
        parting = [topic.answers[key][len(topic.branch(key)):].split()[0] for topic in TOPIC_DATA]
        assert len(set(parting)) == len(parting), (key, parting)
        assert len({topic.branch(key) for topic in TOPIC_DATA}) == 1, key


_check_neutral_answers()
