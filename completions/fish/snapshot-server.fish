function __snapshot-server_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __snapshot-server_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __snapshot-server_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __snapshot-server_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __snapshot-server_parse_tokens -S
    set -l unparsed_tokens (__snapshot-server_tokens -pc)
    switch $unparsed_tokens[1]
    case 'snapshot-server'
        __snapshot-server_parse_subcommand 0 'h/help'
        switch $unparsed_tokens[1]
        case 'serve'
            __snapshot-server_parse_subcommand -r 1 'socket=' 'listen=' 'tls=' 'tls-certificates=' 'tls-verify-peer' 'max-connections=' 'handshake-timeout=' 'idle-timeout=' 'stall-timeout=' 'index-dir=' 'key-file=' 'passphrase-file=' 'h/help'
        case 'index'
            __snapshot-server_parse_subcommand -r 1 'index-dir=' 'key-file=' 'passphrase-file=' 'json' 'h/help'
        case 'compact'
            __snapshot-server_parse_subcommand -r 1 'o/output=' 'progress' 'q/quiet' 'json' 'index-dir=' 'key-file=' 'passphrase-file=' 'h/help'
        case 'retain'
            __snapshot-server_parse_subcommand -r 1 'keep-last=' 'keep-daily=' 'json' 'key-file=' 'passphrase-file=' 'h/help'
        case 'help'
            __snapshot-server_parse_subcommand -r 1 
        end
    end
end

function __snapshot-server_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __snapshot-server_parse_subcommand -S -a positional_count
    argparse -s r -- $argv
    set -l option_specs $argv[2..]
    set -l is_repeating_positional $_flag_r
    set -el _flag_r
    set -a commands $unparsed_tokens[1]
    set positional_index 0
    while true
        set -e unparsed_tokens[1]
        argparse -sn "$commands" $option_specs -- $unparsed_tokens 2> /dev/null
        set unparsed_tokens $argv
        set positional_index (math $positional_index + 1)
        for non_repeating_flag_or_option in $non_repeating_flags_or_options
            if set -ql "_flag_$(string replace -a - _ -- $non_repeating_flag_or_option)"
                set non_repeating_flags_or_options_absent 1
                break
            end
        end
        test (count $unparsed_tokens) -eq 0 -o \( -z "$is_repeating_positional" -a "$positional_index" -gt "$positional_count" \) && break
    end
end

function __snapshot-server_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __snapshot-server_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__snapshot-server_tokens -p)
    if test -z "$(__snapshot-server_tokens -t)"
        set -l index (count (__snapshot-server_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'snapshot-server' -f
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server" -eq 1' -fa 'serve' -d 'Export a chain of stored streams over NBD, read-only.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server" -eq 1' -fa 'index' -d 'Build or check the indexes of stored streams.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server" -eq 1' -fa 'compact' -d 'Write a chain of stored streams out as one full stream.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server" -eq 1' -fa 'retain' -d 'List the stored streams a retention rule no longer needs.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server" -eq 1' -fa 'help' -d 'Show subcommand help information.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" socket' -l 'socket' -d 'Serve on this Unix socket.' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" listen' -l 'listen' -d 'Serve on TCP HOST:PORT (HOST defaults to 127.0.0.1).' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" tls' -l 'tls' -d 'Offer NBD over TLS to clients that ask (on), demand it (require), or not (off).' -rfka 'off on require'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" tls-certificates' -l 'tls-certificates' -d 'Directory with ca-cert.pem, server-cert.pem and server-key.pem (the key mode 0600 or 0640).' -rfa '(__snapshot-server_complete_directories)'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" tls-verify-peer' -l 'tls-verify-peer' -d 'Accept only clients with a certificate signed by the directory\'s ca-cert.pem.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" max-connections' -l 'max-connections' -d 'Clients served at once; more are disconnected as they arrive.' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" handshake-timeout' -l 'handshake-timeout' -d 'Seconds a client has to finish the NBD handshake (TLS included; 0: no limit).' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" idle-timeout' -l 'idle-timeout' -d 'Disconnect a client silent this many seconds between requests (0: never, as a mounted disk may idle).' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" stall-timeout' -l 'stall-timeout' -d 'Disconnect a client that pauses this many seconds inside a request or in taking a reply (0: never).' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" index-dir' -l 'index-dir' -d 'Keep the indexes in this directory: any *.dridx file there is used for the stream it names; new ones are written as STREAM-ID.dridx (default: beside each stream file, as STREAM.dridx; a stream read through NBD then has its index built at each start).' -rfa '(__snapshot-server_complete_directories)'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server serve" -ge 1' -F
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server serve" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server index" index-dir' -l 'index-dir' -d 'Keep the indexes in this directory: any *.dridx file there is used for the stream it names; new ones are written as STREAM-ID.dridx (default: beside each stream file, as STREAM.dridx; a stream read through NBD then has its index built at each start).' -rfa '(__snapshot-server_complete_directories)'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server index" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server index" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server index" -ge 1' -F
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server index" json' -l 'json' -d 'Print one JSON object per stream on standard output.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server index" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" o output' -l 'output' -s 'o' -d 'Write the new full stream to this file.' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" progress' -l 'progress' -d 'Show progress on standard error (default when it is a terminal).'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" q quiet' -l 'quiet' -s 'q' -d 'Print nothing on standard error but errors and warnings.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" json' -l 'json' -d 'Print the summary as one JSON object on standard output.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" index-dir' -l 'index-dir' -d 'Keep the indexes in this directory: any *.dridx file there is used for the stream it names; new ones are written as STREAM-ID.dridx (default: beside each stream file, as STREAM.dridx; a stream read through NBD then has its index built at each start).' -rfa '(__snapshot-server_complete_directories)'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_positional "snapshot-server compact" -ge 1' -F
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server compact" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" keep-last' -l 'keep-last' -d 'Keep the last N points.' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" keep-daily' -l 'keep-daily' -d 'Keep the newest point of each of the last D days (UTC).' -rfka ''
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" json' -l 'json' -d 'Print the plan as one JSON object on standard output.'
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'snapshot-server' -n '__snapshot-server_should_offer_completions_for_flags_or_options "snapshot-server retain" h help' -s 'h' -l 'help' -d 'Show help information.'
