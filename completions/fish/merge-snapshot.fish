function __merge-snapshot_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __merge-snapshot_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __merge-snapshot_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __merge-snapshot_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __merge-snapshot_parse_tokens -S
    set -l unparsed_tokens (__merge-snapshot_tokens -pc)
    switch $unparsed_tokens[1]
    case 'merge-snapshot'
        __merge-snapshot_parse_subcommand 1 'map=' 'i/input=' 'check' 'dry-run' 'mirror' 'key-file=' 'passphrase-file=' 'force' 'clock-skew=' 'reuse=+' 'keep=' 'progress' 'q/quiet' 'json' 'h/help'
        switch $unparsed_tokens[1]
        case 'help'
            __merge-snapshot_parse_subcommand -r 1 
        end
    end
end

function __merge-snapshot_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __merge-snapshot_parse_subcommand -S -a positional_count
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

function __merge-snapshot_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __merge-snapshot_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__merge-snapshot_tokens -p)
    if test -z "$(__merge-snapshot_tokens -t)"
        set -l index (count (__merge-snapshot_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'merge-snapshot' -f
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" map' -l 'map' -d 'The overwrite map of TARGET: its current blocks are not overwritten.' -rfka ''
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" i input' -l 'input' -s 'i' -d 'Read the stream from this file instead of standard input.' -rfka ''
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" check' -l 'check' -d 'Verify the stream alone (CRCs, the tags of an encrypted stream, decompression, END record, digest); no target.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" dry-run' -l 'dry-run' -d 'Read and verify everything and report what would be written and skipped; write nothing.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" mirror' -l 'mirror' -d 'TARGET is a mirror that only merges write: write every block of the stream; the map records the streams for the base check.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" key-file' -l 'key-file' -d 'Read the stream\'s 256-bit key from this file: exactly 32 raw bytes, or 64 hex digits and an optional newline (openssl rand -hex 32 > FILE). Keys are read from files only, never from the command line or the environment.' -rF
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" passphrase-file' -l 'passphrase-file' -d 'Read the passphrase from this file (its content less one trailing newline, 1 to 1024 bytes); the key is derived from it with scrypt. Never from the command line or the environment.' -rF
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" force' -l 'force' -d 'Merge even when the time, base or generation check fails (with a warning).'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" clock-skew' -l 'clock-skew' -d 'Bound on the clock difference between the two sites, in seconds.' -rfka ''
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot"' -l 'reuse' -d 'An image holding content the stream refers to, read only (repeatable).' -rfka ''
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" keep' -l 'keep' -d 'MiB of overwritten target contents kept for later references when merging in place (0: none).' -rfka ''
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" progress' -l 'progress' -d 'Show progress on standard error (default when it is a terminal).'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" q quiet' -l 'quiet' -s 'q' -d 'Print nothing on standard error but errors and warnings.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" json' -l 'json' -d 'Print the summary as one JSON object on standard output.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_flags_or_options "merge-snapshot" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'merge-snapshot' -n '__merge-snapshot_should_offer_completions_for_positional "merge-snapshot" -eq 1' -fa 'help' -d 'Show subcommand help information.'
