function __snapshot_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __snapshot_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __snapshot_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __snapshot_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __snapshot_parse_tokens -S
    set -l unparsed_tokens (__snapshot_tokens -pc)
    switch $unparsed_tokens[1]
    case 'snapshot'
        __snapshot_parse_subcommand 1 'map=' 'have=+' 'as-of=' 'block-size=' 'o/output=' 'base=' 'no-compress' 'encrypt' 'key-file=' 'passphrase-file=' 'threads=' 'direct' 'progress' 'q/quiet' 'json' 'h/help'
        switch $unparsed_tokens[1]
        case 'help'
            __snapshot_parse_subcommand -r 1 
        end
    end
end

function __snapshot_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __snapshot_parse_subcommand -S -a positional_count
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

function __snapshot_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __snapshot_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__snapshot_tokens -p)
    if test -z "$(__snapshot_tokens -t)"
        set -l index (count (__snapshot_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'snapshot' -f
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" map' -l 'map' -d 'Carry only the blocks set in this map (- for standard input).' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot"' -l 'have' -d 'A signature of content the receiver holds; blocks it has are sent as references (repeatable).' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" as-of' -l 'as-of' -d 'The change map saved when SOURCE, a frozen view, was frozen: the stream is the device as of its end.' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" o output' -l 'output' -s 'o' -d 'Write the stream to this file instead of standard output.' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" base' -l 'base' -d 'Mark the stream incremental on top of this stream id (32 hex digits).' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" no-compress' -l 'no-compress' -d 'Store every block raw, without LZ4.'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" encrypt' -l 'encrypt' -d 'Encrypt and authenticate the stream (AES-256-GCM); needs --key-file or --passphrase-file.'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" threads' -l 'threads' -d 'Worker threads (default: one per core).' -rfka ''
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" direct' -l 'direct' -d 'Read with O_DIRECT, past the page cache.'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" progress' -l 'progress' -d 'Show progress on standard error (default when it is a terminal).'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" q quiet' -l 'quiet' -s 'q' -d 'Print nothing on standard error but errors and warnings.'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" json' -l 'json' -d 'Print the summary as one JSON object (on standard error when the stream is on standard output).'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_flags_or_options "snapshot" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'snapshot' -n '__snapshot_should_offer_completions_for_positional "snapshot" -eq 1' -fa 'help' -d 'Show subcommand help information.'
