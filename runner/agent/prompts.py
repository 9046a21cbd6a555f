"""The day and rating prompts, in German (the personas' language) and English."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

Language = Literal["de", "en"]

_DAY = {
    "de": (
        "Heute ist {weekday}, der {date}. Du nutzt gerade die App Mana auf deinem Handy.\n"
        "Module, zu denen du gern greifst: {modules}.\n"
        "Erledige, was dir heute wirklich wichtig wäre: benutze 3 bis 8 Werkzeuge, eins nach dem anderen, "
        "so wie du es als diese Person tun würdest. Wenn etwas nicht klappt, reagiere so, wie du es tun würdest. "
        "Danach sag in 1 bis 2 Sätzen, was du gemacht hast."
    ),
    "en": (
        "Today is {weekday}, {date}. You are using the Mana app on your phone.\n"
        "Modules you like to reach for: {modules}.\n"
        "Do what would really matter to you today: use 3 to 8 tools, one after another, the way this person "
        "would. If something does not work, react as you would. Then say in 1 to 2 sentences what you did."
    ),
}
# Where a day in a shared space happens, and with whom: a person there knows whose space it is.
_PLACE = {
    "de": (
        "Du bist gerade im gemeinsamen Bereich „{name}“ (ein {type}-Space) der App, zusammen mit {others}. "
        "Was du hier anlegst, sehen auch die anderen Mitglieder."
    ),
    "en": (
        "You are in the shared space “{name}” (a {type} space) of the app, together with {others}. "
        "What you create here, the other members see too."
    ),
}
_ALONE = {"de": "niemandem sonst (noch)", "en": "nobody else (yet)"}
_START = {"de": "Dein Tag in Mana beginnt jetzt.", "en": "Your day in Mana starts now."}
_RATING = {
    "de": (
        "Der Tag ist vorbei. Bewerte jetzt, ganz in deiner Rolle, jedes Modul, das du heute benutzt hast "
        "({modules}), mit 1 (schlecht) bis 5 (sehr gut) und einer kurzen Notiz, warum. "
        "Antworte mit dem Werkzeug {tool}."
    ),
    "en": (
        "The day is over. Stay in character and rate every module you used today ({modules}) from "
        "1 (poor) to 5 (great), with a short note on why. Answer with the tool {tool}."
    ),
}
_WEEKDAYS = {
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
}
_NONE = {"de": "keine besonderen – schau dich um", "en": "none in particular – look around"}


def liked_modules(module_mix: dict[str, float], available: set[str]) -> list[str]:
    """The persona's modules that exist as tools, most liked first; others would only confuse it."""
    return [m for m, w in sorted(module_mix.items(), key=lambda kv: -kv[1]) if m in available and w > 0]


@dataclass(frozen=True, slots=True)
class SharedPlace:
    """A shared space a day is played in: its name, its type and the other members' names."""

    name: str
    type: str
    others: list[str]


def system_prompt(
    persona_prompt: str, modules: list[str], today: date, language: Language, place: SharedPlace | None = None
) -> str:
    day = _DAY[language].format(
        weekday=_WEEKDAYS[language][today.weekday()],
        date=today.isoformat(),
        modules=", ".join(modules) or _NONE[language],
    )
    if place is not None:
        others = ", ".join(place.others) or _ALONE[language]
        day += "\n" + _PLACE[language].format(name=place.name, type=place.type, others=others)
    return f"{persona_prompt.strip()}\n\n{day}" if persona_prompt.strip() else day


def start_message(language: Language) -> str:
    return _START[language]


def rating_prompt(modules: list[str], tool: str, language: Language) -> str:
    return _RATING[language].format(modules=", ".join(modules), tool=tool)
