"""Print the settings table of docs/settings.md from the Settings class (`python scripts/settings_table.py`)."""

from shared.settings import Settings, env_name


def table() -> str:
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(unset)" if default is None else ("(empty)" if default == "" else f"`{default}`")
        rows.append(f"| `{env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
