# Sourced by demo.sh and test.sh, in the repository root: `install_venv EXTRAS` makes .venv and
# installs the package with EXTRAS into it, saying so in one line, unless the same install is
# there already: a stamp in .venv holds a hash of pyproject.toml, constraints.txt and EXTRAS.
install_venv() {
  local extras="$1" stamp=".venv/.ewc-install-$1" want
  want="$(cat pyproject.toml constraints.txt <(echo "$extras") | sha256sum | cut -d' ' -f1)"
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "installing ewc[$extras] and its dependencies (torch among them) into .venv;" \
    "the first time takes a few minutes..." >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  echo "$want" >"$stamp"
}
