#!/usr/bin/env bash
# The UI translations (Flask-Babel, domain "messages", webapp/translations/<locale>).
#
#   bash scripts/i18n.sh                 extract + update + compile (what you want after changing UI text)
#   bash scripts/i18n.sh extract [FILE]  write the message template to FILE
#                                        (default webapp/translations/messages.pot; not kept in git)
#   bash scripts/i18n.sh update          extract to a temporary template, merge it into every locale's .po
#   bash scripts/i18n.sh compile         compile every .po into the messages.mo the app loads
#
# After `update`, translate the new entries (empty msgstr) and the ones marked "#, fuzzy" (then delete
# that flag) in webapp/translations/<locale>/LC_MESSAGES/messages.po, and run `compile`.
# tests/test_i18n.py fails while any UI string is untranslated, fuzzy, or the .mo is stale.
#
# Uses .venv/bin/pybabel if present, else pybabel on PATH (and $PYTHON, default python3, which must
# import babel and the project's dependencies).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TRANSLATIONS=webapp/translations
DOMAIN=messages
LOCALES=(zh)
# Python keywords besides Babel's defaults (_, gettext, ngettext, ...); keep in step with tests/test_i18n.py.
KEYWORDS=(-k _l -k lazy_gettext -k N_)

if [[ -x .venv/bin/pybabel ]]; then
    PYBABEL=.venv/bin/pybabel
    PYTHON=.venv/bin/python
elif command -v pybabel >/dev/null 2>&1; then
    PYBABEL=pybabel
    PYTHON="${PYTHON:-python3}"
else
    echo "i18n.sh: pybabel not found: create .venv (pip install -e '.[test]') or install Babel" >&2
    exit 1
fi

version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' appliance/__init__.py
}

extract() {
    local out="$1"
    "$PYBABEL" -q extract -F babel.cfg "${KEYWORDS[@]}" --add-comments=TRANSLATORS: \
        --project=crm-appliance --version="$(version)" -o "$out" .
}

TMP_POT=""
trap 'rm -f "$TMP_POT" "$TMP_POT.old"' EXIT

update() {
    TMP_POT="$(mktemp "${TMPDIR:-/tmp}/crm-messages.XXXXXX")"
    extract "$TMP_POT"
    local locale po
    for locale in "${LOCALES[@]}"; do
        po="$TRANSLATIONS/$locale/LC_MESSAGES/$DOMAIN.po"
        if [[ -f "$po" ]]; then
            cp -p "$po" "$TMP_POT.old"
            "$PYBABEL" update -w 120 -i "$TMP_POT" -d "$TRANSLATIONS" -D "$DOMAIN" -l "$locale" --previous --ignore-obsolete
            # Keep the file untouched when only the template's creation date moved (no churn in git).
            if diff -q <(grep -v '^"POT-Creation-Date: ' "$TMP_POT.old") <(grep -v '^"POT-Creation-Date: ' "$po") \
                    >/dev/null; then
                cp -p "$TMP_POT.old" "$po"
            fi
            rm -f "$TMP_POT.old"
        else
            "$PYBABEL" init -i "$TMP_POT" -d "$TRANSLATIONS" -D "$DOMAIN" -l "$locale"
        fi
    done
}

compile() {
    "$PYBABEL" compile -d "$TRANSLATIONS" -D "$DOMAIN" --statistics
}

case "${1:-all}" in
    extract) extract "${2:-$TRANSLATIONS/$DOMAIN.pot}" ;;
    update) update ;;
    compile) compile ;;
    all) update; compile ;;
    *)
        echo "usage: bash scripts/i18n.sh [extract [FILE] | update | compile | all]" >&2
        exit 2
        ;;
esac
