function __bitmap-diff_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __bitmap-diff_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __bitmap-diff_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __bitmap-diff_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __bitmap-diff_parse_tokens -S
    set -l unparsed_tokens (__bitmap-diff_tokens -pc)
    switch $unparsed_tokens[1]
    case 'bitmap-diff'
        __bitmap-diff_parse_subcommand -r 1 'signature' 'digest=' 'block-size=' 'map=' 'sample=' 'seed=' 'o/output=' 'extents' 'allow-size-change' 'threads=' 'direct' 'progress' 'q/quiet' 'h/help'
        switch $unparsed_tokens[1]
        case 'help'
            __bitmap-diff_parse_subcommand -r 1 
        end
    end
end

function __bitmap-diff_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __bitmap-diff_parse_subcommand -S -a positional_count
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

function __bitmap-diff_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __bitmap-diff_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__bitmap-diff_tokens -p)
    if test -z "$(__bitmap-diff_tokens -t)"
        set -l index (count (__bitmap-diff_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'bitmap-diff' -f
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" signature' -l 'signature' -d 'Write a signature of SOURCE instead of comparing.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" digest' -l 'digest' -d 'Digest for --signature, by its OpenSSL name.' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" map' -l 'map' -d 'With --signature, sign only the blocks this map sets (a sparse signature); its block size is the signature\'s.' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" sample' -l 'sample' -d 'With --signature, sign a pseudo-random sample of this fraction of the blocks (0.001 or 1/1000): a sparse signature.' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" seed' -l 'seed' -d 'The seed of --sample, 0 to 2^64 - 1: the same fraction and seed choose the same blocks (default: random, told on standard error).' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" o output' -l 'output' -s 'o' -d 'Write the map or signature to this file (saved atomically).' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" extents' -l 'extents' -d 'Print the differing byte ranges as START LENGTH lines instead of a map.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" allow-size-change' -l 'allow-size-change' -d 'Compare sources of different sizes; the part of B past A\'s end differs.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" threads' -l 'threads' -d 'Worker threads (default: one per core).' -rfka ''
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" direct' -l 'direct' -d 'Read with O_DIRECT, past the page cache, so a large compare does not evict a live system\'s cache.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" progress' -l 'progress' -d 'Show progress on standard error (default when it is a terminal).'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" q quiet' -l 'quiet' -s 'q' -d 'Print nothing on standard error but errors and warnings.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_flags_or_options "bitmap-diff" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'bitmap-diff' -n '__bitmap-diff_should_offer_completions_for_positional "bitmap-diff" -eq 1' -fa 'help' -d 'Show subcommand help information.'
