# Sourced by scripts/test: the command-line tools the tests drive, from Debian's packages.
# swaks: a real, independent SMTP client for the submission tests.
needed=()
command -v swaks >/dev/null 2>&1 || needed+=(swaks)
if [ ${#needed[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${needed[*]} (apt-get)"
        apt-get install -y -q "${needed[@]}" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null && apt-get install -y -q "${needed[@]}" >/dev/null
        }
    else
        echo "note: ${needed[*]} not installed and not root; install with: sudo apt-get install ${needed[*]}" >&2
    fi
fi
